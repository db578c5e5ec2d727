"""Declare a classifier's penultimate layer as its embedding output (`quarry.embedding`).

Usage: python -m training.embedding_output MODEL.onnx [--out OUT.onnx]

The tensor the final layer (Gemm or MatMul) reads becomes a second graph output named
`embedding`, and the metadata key `quarry.embedding` names it; the classifier's output and every
other node are left as they are, so its predictions do not change. `training.train` does this on
export; this command does it to a model already trained. Needs the training extra (onnx).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from common.model import EMBEDDING_KEY

EMBEDDING_OUTPUT = "embedding"
FINAL_LAYERS = ("Gemm", "MatMul")


def add_embedding_output(proto: onnx.ModelProto) -> str:
    """Add the embedding output in place; returns the name of the tensor it exposes."""
    graph = proto.graph
    if any(output.name == EMBEDDING_OUTPUT for output in graph.output):
        raise ValueError(f"the model already has an output named {EMBEDDING_OUTPUT!r}")
    logits = graph.output[0].name
    final = next((node for node in graph.node if logits in node.output), None)
    if final is None or final.op_type not in FINAL_LAYERS:
        raise ValueError(f"{logits!r} is not made by a {' or '.join(FINAL_LAYERS)} layer")
    features = final.input[0]
    graph.node.append(helper.make_node("Identity", [features], [EMBEDDING_OUTPUT], name="embedding"))
    graph.output.append(helper.make_tensor_value_info(EMBEDDING_OUTPUT, TensorProto.FLOAT, ["batch", None]))
    for entry in list(proto.metadata_props):
        if entry.key == EMBEDDING_KEY:
            proto.metadata_props.remove(entry)
    proto.metadata_props.add(key=EMBEDDING_KEY, value=EMBEDDING_OUTPUT)
    onnx.checker.check_model(proto)
    return features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--out", type=Path, help="where to write it (default: over MODEL)")
    args = parser.parse_args()
    proto = onnx.load(str(args.model))
    features = add_embedding_output(proto)
    onnx.save(proto, str(args.out or args.model))
    print(f"{args.out or args.model}: output {EMBEDDING_OUTPUT!r} is {features!r}")


if __name__ == "__main__":
    main()
