import json
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from common.config import Settings
from common.errors import ModelError
from common.model import HIERARCHY_KEY, LABELS_KEY, PREPROCESS_KEY, Classifier, Preprocess, locate_model
from common.storage import ObjectStore

PREPROCESS = Preprocess(
    height=4,
    width=2,
    resize="stretch",
    pad=255,
    channel_order="RGB",
    mean=(0.5, 0.25, 0.0),
    std=(0.5, 0.25, 1.0),
)


def make_model(path: Path, *, labels: list[str], input_shape: list[object], metadata: dict[str, str]) -> Path:
    """A real ONNX graph: global average pool, then a fixed linear layer to len(labels) classes."""
    classes = len(labels)
    weights = np.arange(3 * classes, dtype=np.float32).reshape(3, classes)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def good_metadata(labels: list[str]) -> dict[str, str]:
    return {
        LABELS_KEY: json.dumps(labels),
        PREPROCESS_KEY: PREPROCESS.to_json(),
        HIERARCHY_KEY: json.dumps({label: ["Apparel", "Topwear"] for label in labels}),
    }


def test_preprocessing_matches_a_hand_computed_tensor() -> None:
    bgr = np.zeros((4, 2, 3), dtype=np.uint8)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = 255, 128, 0  # blue=255, green=128, red=0
    tensor = PREPROCESS.tensor([bgr])
    assert tensor.shape == (1, 3, 4, 2) and tensor.dtype == np.float32
    expected_per_channel = [
        (0 / 255 - 0.5) / 0.5,
        (128 / 255 - 0.25) / 0.25,
        (255 / 255 - 0.0) / 1.0,
    ]  # R, G, B
    for channel, value in enumerate(expected_per_channel):
        assert np.allclose(tensor[0, channel], value, atol=1e-6)


@pytest.mark.parametrize("channel_order", ["RGB", "BGR"])
def test_preprocessing_is_the_formula_bit_for_bit(channel_order: str) -> None:
    """The batch tensor is (x/255 - mean) / std in float32 per channel, in the model's order."""
    preprocess = Preprocess(6, 5, "stretch", 0, channel_order, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    images = list(np.random.default_rng(3).integers(0, 256, (3, 6, 5, 3), dtype=np.uint8))
    tensor = preprocess.tensor(images)
    order = [2, 1, 0] if channel_order == "RGB" else [0, 1, 2]
    for n, image in enumerate(images):
        for channel, source in enumerate(order):
            mean, std = np.float32(preprocess.mean[channel]), np.float32(preprocess.std[channel])
            scale = np.float32(1) / (np.float32(255) * std)
            expected = image[..., source].astype(np.float32) * scale - mean / std
            assert np.array_equal(tensor[n, channel], expected)


def test_letterbox_pads_with_the_pad_value() -> None:
    letterbox = Preprocess(height=8, width=8, pad=255)
    fitted = letterbox.fit(np.zeros((8, 4, 3), dtype=np.uint8))
    assert fitted.shape == (8, 8, 3)
    assert (fitted[:, :2] == 255).all() and (fitted[:, 2:6] == 0).all() and (fitted[:, 6:] == 255).all()


def test_metadata_round_trip_and_prediction(tmp_path: Path) -> None:
    labels = ["Shirts", "Jeans", "Watches"]
    path = make_model(
        tmp_path / "m.onnx", labels=labels, input_shape=["batch", 3, 4, 2], metadata=good_metadata(labels)
    )
    classifier = Classifier(path, providers=["CPUExecutionProvider"])
    assert classifier.info.labels == labels
    assert classifier.info.preprocess == PREPROCESS
    assert classifier.info.hierarchy["Jeans"] == ["Apparel", "Topwear"]
    assert classifier.provider == "CPUExecutionProvider"
    white = np.full((4, 2, 3), 255, dtype=np.uint8)
    (prediction,) = classifier.predict([white], top_k=2)
    # pooled = (R, G, B) normalised = (1, 3, 1); logits = pooled @ [[0,1,2],[3,4,5],[6,7,8]] = (15, 20, 25)
    assert prediction.label == "Watches"
    assert [entry["label"] for entry in prediction.top_k] == ["Watches", "Jeans"]
    assert prediction.score == pytest.approx(np.exp(25) / np.exp([15, 20, 25]).sum(), rel=1e-5)


@pytest.mark.parametrize(
    ("input_shape", "metadata", "message"),
    [
        (["batch", 3, 4, 2], {}, "lacks quarry.labels, quarry.preprocess"),
        (
            ["batch", 3, 4, 2],
            {LABELS_KEY: "not json", PREPROCESS_KEY: PREPROCESS.to_json()},
            "not valid JSON",
        ),
        (
            ["batch", 3, 4, 2],
            {LABELS_KEY: '["a","b"]', PREPROCESS_KEY: PREPROCESS.to_json()},
            "3 outputs but 2 labels",
        ),
        (["batch", 3, 28, 28], None, "cannot be produced by the preprocessing"),
        (["batch", 3, 4, 2], {LABELS_KEY: '["a","b","c"]', PREPROCESS_KEY: '{"height": 4}'}, "malformed"),
    ],
)
def test_bad_models_are_refused(
    tmp_path: Path, input_shape: list[object], metadata: dict[str, str] | None, message: str
) -> None:
    labels = ["a", "b", "c"]
    path = make_model(
        tmp_path / "bad.onnx",
        labels=labels,
        input_shape=input_shape,
        metadata=good_metadata(labels) if metadata is None else metadata,
    )
    with pytest.raises(ModelError, match=message):
        Classifier(path, providers=["CPUExecutionProvider"])


def test_a_file_that_is_not_onnx_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load model"):
        Classifier(path, providers=["CPUExecutionProvider"])


def no_store() -> ObjectStore:
    raise AssertionError("a model by name or path needs no S3")


def test_locate_model_by_name_path_and_refusal(tmp_path: Path) -> None:
    (tmp_path / "mine.onnx").write_bytes(b"x")
    assert locate_model("mine", tmp_path, tmp_path, no_store) == tmp_path / "mine.onnx"
    assert locate_model(str(tmp_path / "mine.onnx"), Path("/nowhere"), tmp_path, no_store).name == "mine.onnx"
    with pytest.raises(ModelError, match="no model 'other'"):
        locate_model("other", tmp_path, tmp_path, no_store)


def test_an_s3_model_is_cached_by_etag_and_fetched_again_when_it_changes(
    store: ObjectStore, settings: Settings, tmp_path: Path
) -> None:
    """Against the S3 server: the cache keeps the object's current version only, in a folder
    its user alone may read, and a model rewritten under the same key is downloaded again."""
    bucket, key = settings.raw_bucket, f"models/{uuid.uuid4().hex}.onnx"
    reference, cache = f"s3://{bucket}/{key}", tmp_path / "cache"
    store.put(bucket, key, b"version one", content_type="application/octet-stream", metadata={})
    first = locate_model(reference, Path("/nowhere"), cache, lambda: store)
    assert first.read_bytes() == b"version one"
    assert locate_model(reference, Path("/nowhere"), cache, lambda: store) == first  # unchanged: kept
    store.put(bucket, key, b"version two", content_type="application/octet-stream", metadata={})
    second = locate_model(reference, Path("/nowhere"), cache, lambda: store)
    assert second.read_bytes() == b"version two" and second != first
    assert sorted(second.parent.iterdir()) == [second]  # the old version removed
    assert (cache.stat().st_mode & 0o777, second.parent.stat().st_mode & 0o777) == (0o700, 0o700)
