//! The row "libraries mapped after warm-up": which of the wheel's on-demand CUDA libraries
//! (the groups of `image/cuda-extras.txt`, which the image's `CUDA_EXTRAS` keeps or leaves
//! out) this process has mapped once the models have run on the card, read from
//! `/proc/self/maps`. A group no check loaded can be left out of an image for these handlers;
//! a library of the "never" group mapped means the list is wrong.

use std::collections::BTreeSet;

use super::{Ctx, Table, Verdict};

const EXTRAS: &str = include_str!("../../image/cuda-extras.txt");
const CHECK: &str = "libraries mapped after warm-up";

/// What the maps say of the groups.
#[derive(Debug, Default, PartialEq, Eq)]
struct Mapped {
    /// Groups with a library mapped, and those libraries.
    used: Vec<(String, Vec<String>)>,
    /// Groups with none mapped.
    unused: Vec<String>,
    /// Libraries of the "never" group that are mapped (the list is wrong).
    never: Vec<String>,
}

/// The file names of the shared libraries in a `/proc/PID/maps` text.
fn libraries(maps: &str) -> BTreeSet<String> {
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .filter(|path| path.contains(".so"))
        .filter_map(|path| path.rsplit('/').next())
        .map(str::to_owned)
        .collect()
}

fn classify(maps: &str, extras: &str) -> Mapped {
    let mapped = libraries(maps);
    let mut result = Mapped::default();
    for line in extras.lines() {
        let mut words = line.split_whitespace();
        let Some(group) = words.next().filter(|g| !g.starts_with('#')) else {
            continue;
        };
        let hits: Vec<String> = words
            .flat_map(|prefix| mapped.iter().filter(move |name| name.starts_with(prefix)))
            .cloned()
            .collect();
        match (group, hits.is_empty()) {
            ("never", _) => result.never = hits,
            (_, true) => result.unused.push(group.to_owned()),
            (_, false) => result.used.push((group.to_owned(), hits)),
        }
    }
    result
}

/// Adds the row (run it last: every check's models have run by then).
pub(super) fn row(ctx: &Ctx, table: &mut Table) {
    if ctx.simulated {
        table.add(CHECK, "a simulated GPU maps no CUDA library", Verdict::Skip);
        return;
    }
    let maps = match std::fs::read_to_string("/proc/self/maps") {
        Ok(maps) => maps,
        Err(e) => return table.add(CHECK, format!("/proc/self/maps: {e}"), Verdict::Fail),
    };
    let mapped = classify(&maps, EXTRAS);
    let used: Vec<String> = mapped
        .used
        .iter()
        .map(|(group, names)| format!("{group} ({})", names.join(", ")))
        .collect();
    let kept: Vec<&str> = mapped.used.iter().map(|(g, _)| g.as_str()).collect();
    let mut figure = format!(
        "mapped: {}; never mapped: {}; enough for these handlers: CUDA_EXTRAS=\"{}\"",
        if used.is_empty() {
            "none".to_owned()
        } else {
            used.join("; ")
        },
        if mapped.unused.is_empty() {
            "none".to_owned()
        } else {
            mapped.unused.join(", ")
        },
        kept.join(" ")
    );
    if !mapped.never.is_empty() {
        figure = format!(
            "{figure}; mapped although listed as never: {}",
            mapped.never.join(", ")
        );
    }
    let verdict = if mapped.never.is_empty() {
        Verdict::Reported
    } else {
        Verdict::Fail
    };
    table.add(CHECK, figure, verdict);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
7f00-7f01 r-xp 00000000 08:01 1 /opt/site-packages/torch/lib/libtorch_cuda.so
7f01-7f02 r-xp 00000000 08:01 2 /opt/site-packages/nvidia/cudnn/lib/libcudnn_graph.so.9
7f02-7f03 r-xp 00000000 08:01 3 /opt/site-packages/nvidia/cudnn/lib/libcudnn_ops.so.9
7f03-7f04 rw-p 00000000 00:00 0 [heap]
";

    #[test]
    fn the_maps_sort_the_groups_into_used_and_unused() {
        let mapped = classify(MAPS, EXTRAS);
        assert_eq!(mapped.used.len(), 1, "{mapped:?}");
        assert_eq!(mapped.used[0].0, "cudnn");
        assert_eq!(
            mapped.used[0].1,
            vec![
                "libcudnn_graph.so.9".to_owned(),
                "libcudnn_ops.so.9".to_owned()
            ]
        );
        assert!(mapped.unused.contains(&"linalg".to_owned()), "{mapped:?}");
        assert!(!mapped.unused.contains(&"never".to_owned()));
        assert!(mapped.never.is_empty());
    }

    #[test]
    fn a_library_listed_as_never_loaded_is_caught() {
        let maps = format!("{MAPS}7f05-7f06 r-xp 0 0 9 /x/torch/lib/libtorch_python.so\n");
        assert_eq!(
            classify(&maps, EXTRAS).never,
            vec!["libtorch_python.so".to_owned()]
        );
    }

    #[test]
    fn this_process_is_read_without_error() {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let mapped = classify(&maps, EXTRAS);
        assert!(mapped.never.is_empty(), "{mapped:?}");
    }
}
