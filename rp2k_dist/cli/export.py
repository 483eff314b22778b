"""``rp2k export``: its handler and its parser."""

from __future__ import annotations

import argparse

from ..storage import display


def cmd_export(args: argparse.Namespace) -> int:
    from ..analysis.export import export_onnx, export_safetensors
    from ..run_folder import MODEL_ONNX, MODEL_SAFETENSORS
    from ..storage import join

    if args.format in ("onnx", "both"):
        result = export_onnx(args.checkpoint, join(args.out, MODEL_ONNX), opset=args.opset)
        print(f"ONNX (opset {result.opset}): {display(result.path)}, model card {display(result.card)}; "
              f"max |logit difference| vs PyTorch {result.max_abs_diff:.2e}")
    if args.format in ("safetensors", "both"):
        result = export_safetensors(args.checkpoint, join(args.out, MODEL_SAFETENSORS))
        print(f"safetensors: {display(result.path)}, model card {display(result.card)}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``rp2k export`` to the ``rp2k`` subcommands."""
    p = sub.add_parser("export", help="export a checkpoint as ONNX (checked with onnxruntime) and/or safetensors")
    p.add_argument("checkpoint", help="run folder, checkpoint folder or checkpoint.pt")
    p.add_argument("out", help="output folder (model.onnx, model.safetensors, each with a .json model card)")
    p.add_argument("--format", choices=["onnx", "safetensors", "both"], default="both")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (the torch.export exporter starts at 18)")
    p.set_defaults(func=cmd_export)
