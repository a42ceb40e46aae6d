"""BFCL's own data and AST checker, run in the separate environment where `bfcl-eval` is installed.

`bfcl-eval` pins numpy 1.26 (which breaks pyarrow, hence `datasets`, in Chime's environment) and
imports every vendor SDK its model handlers use, so it lives in its own virtual environment
(`make bfcl-setup` creates `.venv-bfcl`). This script uses only the standard library and `bfcl_eval`;
`chime bfcl` (training/bfcl.py) runs it there:

    python training/bfcl_score.py dump CATEGORY [--limit N]     entries as JSON lines on stdout
    python training/bfcl_score.py score < results.jsonl         one verdict per line on stdout

A result line is {"id", "category", "calls": [{"name": ..., "arguments": {...}}, ...]}; a verdict
adds "valid" and, when invalid, "error" and "error_type", exactly as bfcl-eval's checker says:
`ast_checker` for simple/multiple/parallel categories and the no-call rule for irrelevance. The
questions and functions are BFCL's evaluation data: never use them for training.
"""

from __future__ import annotations

import argparse
import json
import sys

# A leaderboard model whose function names keep their dots (the checker's name conversion needs one).
CHECKER_MODEL = "gorilla-openfunctions-v2"


def dump(category: str, limit: int | None) -> None:
    from bfcl_eval.utils import load_dataset_entry, load_ground_truth_entry

    prompts = load_dataset_entry(category, include_prereq=False, include_language_specific_hint=True)
    answers = {} if "irrelevance" in category else {a["id"]: a["ground_truth"] for a in load_ground_truth_entry(category)}
    for entry in prompts[:limit]:
        out = {"id": entry["id"], "category": category, "question": entry["question"], "function": entry["function"]}
        if entry["id"] in answers:
            out["ground_truth"] = answers[entry["id"]]
        print(json.dumps(out, ensure_ascii=False))


def score(lines: list[str]) -> None:
    from bfcl_eval.constants.enums import Language
    from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
    from bfcl_eval.utils import (
        is_empty_output,
        is_function_calling_format_output,
        load_dataset_entry,
        load_ground_truth_entry,
    )

    prompts: dict[str, dict[str, dict]] = {}
    answers: dict[str, dict[str, list]] = {}
    for line in lines:
        item = json.loads(line)
        category, calls = item["category"], item["calls"]
        if category not in prompts:
            entries = load_dataset_entry(category, include_prereq=False, include_language_specific_hint=False)
            prompts[category] = {e["id"]: e for e in entries}
            if "irrelevance" not in category:
                answers[category] = {a["id"]: a["ground_truth"] for a in load_ground_truth_entry(category)}
        decoded = [{c["name"]: c["arguments"]} for c in calls]
        verdict: dict = {"id": item["id"], "category": category}
        if "irrelevance" in category:
            verdict["valid"] = is_empty_output(decoded)
            if not verdict["valid"]:
                verdict.update(error=["the model called a function"], error_type="irrelevance:function_called")
        elif not decoded or not is_function_calling_format_output(decoded):
            verdict.update(valid=False, error=["no function call"], error_type="ast_decoder:no_call")
        else:
            result = ast_checker(
                prompts[category][item["id"]]["function"], decoded, answers[category][item["id"]],
                Language.PYTHON, category, CHECKER_MODEL,
            )  # fmt: skip
            verdict["valid"] = bool(result["valid"])
            if not result["valid"]:
                verdict.update(error=result.get("error"), error_type=result.get("error_type"))
        print(json.dumps(verdict, ensure_ascii=False, default=str))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("category")
    d.add_argument("--limit", type=int)
    sub.add_parser("score")
    args = ap.parse_args()
    if args.cmd == "dump":
        dump(args.category, args.limit)
    else:
        score([line for line in sys.stdin if line.strip()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
