//! Memory sizes as `runpod.toml` writes them: strings with a unit (`"6GB"`, `"512MiB"`).
//!
//! `GB`/`MB` are decimal (10^9, 10^6) and `GiB`/`MiB` binary (docs/configuration.md); parsing is
//! the `bytesize` crate's, with one rule added: a bare number is refused, because "6" could mean
//! bytes or gigabytes and a reservation off by 10^9 is the kind of mistake that costs an OOM.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The largest size a config may name (a petabyte): beyond it, a number is a typo or an
/// overflow, not a plan.
pub const MAX_SIZE: Size = Size(1_000_000_000_000_000);

/// A GPU reservation of `"all"`: the whole budget a device has for jobs (its memory less the
/// headroom and the worker's resident memory), so a job has the card to itself. Only the
/// reservation keys (`gpu_memory`, `gpu_memory_per_request`) accept it.
pub const WHOLE_BUDGET: Size = Size(u64::MAX);

/// A byte count read from a size string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Size(u64);

impl Size {
    /// A size of exactly `bytes`.
    pub const fn from_bytes(bytes: u64) -> Self {
        Self(bytes)
    }

    /// `n` decimal gigabytes (10^9 bytes each).
    pub const fn gb(n: u64) -> Self {
        Self(n * 1_000_000_000)
    }

    /// The byte count.
    pub const fn bytes(self) -> u64 {
        self.0
    }

    /// Whether this is the reservation `"all"` ([`WHOLE_BUDGET`]).
    pub const fn is_whole_budget(self) -> bool {
        self.0 == WHOLE_BUDGET.0
    }

    /// The bytes this reservation takes on a device with `room` for jobs (`"all"` takes it all).
    pub fn within(self, room: u64) -> u64 {
        if self.is_whole_budget() {
            room
        } else {
            self.0
        }
    }

    /// A rounded figure for people (`14.5GB`, `466MB`); `Display` writes the exact size.
    pub fn approx(self) -> String {
        if self.0 >= 1_000_000_000 {
            format!("{:.1}GB", self.0 as f64 / 1e9)
        } else {
            format!("{:.0}MB", self.0 as f64 / 1e6)
        }
    }

    /// The size in GiB (bytes / 2^30), the unit of `/health`'s `*_vram_gb` fields.
    pub fn gib(self) -> f64 {
        self.0 as f64 / (1u64 << 30) as f64
    }
}

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// The string is empty or has no unit.
    #[error("{0:?} has no unit; write it like \"6GB\", \"512MB\" or \"24GiB\"")]
    MissingUnit(String),
    /// The number or the unit could not be read.
    #[error("{value:?} is not a size ({reason}); write it like \"6GB\", \"512MB\" or \"24GiB\"")]
    Invalid {
        /// The string as written.
        value: String,
        /// What the parser said.
        reason: String,
    },
}

impl FromStr for Size {
    type Err = SizeError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let trimmed = value.trim();
        if !trimmed.chars().any(|c| c.is_ascii_alphabetic()) {
            return Err(SizeError::MissingUnit(value.to_owned()));
        }
        if !trimmed.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(SizeError::Invalid {
                value: value.to_owned(),
                reason: "it must start with a number".to_owned(),
            });
        }
        let size = trimmed
            .parse::<bytesize::ByteSize>()
            .map_err(|reason| SizeError::Invalid {
                value: value.to_owned(),
                reason,
            })?;
        // bytesize saturates at u64::MAX instead of failing: anything near it is a typo.
        if size.as_u64() > MAX_SIZE.0 {
            return Err(SizeError::Invalid {
                value: value.to_owned(),
                reason: format!("it is over {MAX_SIZE}, more than any memory or document here"),
            });
        }
        Ok(Self(size.as_u64()))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const GB: u64 = 1_000_000_000;
        const MB: u64 = 1_000_000;
        const GIB: u64 = 1 << 30;
        const MIB: u64 = 1 << 20;
        match self.0 {
            u64::MAX => write!(f, "all"),
            0 => write!(f, "0B"),
            b if b % GB == 0 => write!(f, "{}GB", b / GB),
            b if b % GIB == 0 => write!(f, "{}GiB", b / GIB),
            b if b % MB == 0 => write!(f, "{}MB", b / MB),
            b if b % MIB == 0 => write!(f, "{}MiB", b / MIB),
            b => write!(f, "{b}B"),
        }
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_too_large_to_mean_anything_are_refused_not_saturated() {
        let error = "99999999999999999999TB".parse::<Size>().unwrap_err();
        assert!(error.to_string().contains("over 1000000GB"), "{error}");
        assert!("2PB".parse::<Size>().is_err());
        assert_eq!("1PB".parse::<Size>().unwrap(), MAX_SIZE);
    }

    #[test]
    fn decimal_and_binary_units_differ_as_designed() {
        assert_eq!("6GB".parse::<Size>().unwrap().bytes(), 6_000_000_000);
        assert_eq!("512MB".parse::<Size>().unwrap().bytes(), 512_000_000);
        assert_eq!("24GiB".parse::<Size>().unwrap().bytes(), 24 << 30);
        assert_eq!("1.5 GiB".parse::<Size>().unwrap().bytes(), 3 << 29);
        assert_eq!("100MiB".parse::<Size>().unwrap().bytes(), 100 << 20);
    }

    #[test]
    fn bare_numbers_and_unknown_units_are_refused() {
        assert!(matches!(
            "6".parse::<Size>(),
            Err(SizeError::MissingUnit(_))
        ));
        assert!(matches!("".parse::<Size>(), Err(SizeError::MissingUnit(_))));
        assert!(matches!(
            "6XB".parse::<Size>(),
            Err(SizeError::Invalid { .. })
        ));
        assert!(matches!(
            "GB".parse::<Size>(),
            Err(SizeError::Invalid { .. })
        ));
        assert!(matches!(
            "-1GB".parse::<Size>(),
            Err(SizeError::Invalid { .. })
        ));
    }

    #[test]
    fn display_round_trips_through_parse() {
        for text in ["6GB", "24GiB", "512MB", "100MiB", "0B", "1234B"] {
            let size: Size = text.parse().unwrap();
            assert_eq!(size.to_string(), text);
            assert_eq!(size.to_string().parse::<Size>().unwrap(), size);
        }
    }
}
