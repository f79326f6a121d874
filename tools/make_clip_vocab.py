"""Build CLIP's BPE vocab.json / merges.txt (Hugging Face layout) from open_clip's bpe_simple_vocab_16e6.txt.gz.

The .gz ships inside the open_clip_torch wheel (MIT). Fetch the wheel without installing it (installing
pulls a CUDA torch), then run:

    pip download --no-deps open_clip_torch -d /tmp/oc
    python tools/make_clip_vocab.py /tmp/oc/open_clip_torch-*.whl export/assets/clip

The result is the 49408-token vocabulary of OpenAI's CLIP tokenizer, ordered as open_clip orders it:
256 byte symbols, the same with an end-of-word mark, one token per merge, then the two specials.
"""

from __future__ import annotations

import gzip
import json
import sys
import zipfile
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2  # open_clip keeps the first 48894 merges of the file


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def read_merges(source: Path) -> list[str]:
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as whl:
            data = whl.read("open_clip/bpe_simple_vocab_16e6.txt.gz")
    else:
        data = source.read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    return lines[1 : NUM_MERGES + 1]


def main(source: str, out_dir: str) -> None:
    merges = read_merges(Path(source))
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
