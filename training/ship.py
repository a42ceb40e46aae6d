"""Ship a trained adapter as the default: copy it into `model/adapters/default` with reference decisions.

    python -m training.ship runs/cpu-lora/adapter [--reference-conversations 6]

The reference file records P(respond) and the decision for every scored message of the first few dev
conversations, as the engine computed them with the shipped adapter; a test replays them to check
that what ships reproduces what was measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from model.loading import SHIPPED_ADAPTER_DIR

REFERENCE_FILE = "reference_decisions.json"
KEEP = ("adapter_config.json", "adapter_model.safetensors", "chime_adapter.json", "run_card.json", "run_card.md")


def record_reference(adapter_dir: Path, dev_file: str, n: int) -> dict:
    from model.config import EngineConfig
    from model.conversation import read_conversations
    from model.engine import Engine
    from training.evaluate import evaluate

    engine = Engine.from_config(EngineConfig(adapter=str(adapter_dir), seed=0, temperature=0.0))
    convs = read_conversations(dev_file)[:n]
    metrics, rows = evaluate(engine, convs)
    return {
        "file": dev_file,
        "conversations": [c.id for c in convs],
        "threshold": engine.config.threshold,
        "rows": [{"id": r.conversation_id, "index": r.index, "p_respond": round(r.p_respond, 5), "decision": r.decision} for r in rows],
    }


def ship(src: str, dev_file: str, n: int, dest: Path = SHIPPED_ADAPTER_DIR) -> Path:
    src_dir = Path(src)
    if not (src_dir / "adapter_config.json").is_file():
        raise SystemExit(f"not an adapter directory: {src}")
    tmp = dest.with_name(dest.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in KEEP:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, tmp / name)
    # The adapter config names the base model by its local path; record it by its role instead.
    cfg = json.loads((tmp / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "SmolLM2-135M-Instruct"
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (tmp / REFERENCE_FILE).write_text(json.dumps(record_reference(tmp, dev_file, n), indent=1) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapter")
    ap.add_argument("--dev-file", default="conversations/dev/batch_A.jsonl")
    ap.add_argument("--reference-conversations", type=int, default=6)
    args = ap.parse_args()
    print(ship(args.adapter, args.dev_file, args.reference_conversations))


if __name__ == "__main__":
    main()
