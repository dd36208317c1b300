from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from continual.config import InputSettings, ModelSettings
from continual.models import (
    Classifier,
    ModelError,
    TransformError,
    UnknownArchitecture,
    WeightsFileError,
    WeightsUnavailable,
    apply_mode,
    build_model,
    imagenet_model,
    make_transform,
    set_train_mode,
)

IMG = InputSettings(kind="image", size=(32, 32), channels=3)
VEC = InputSettings(kind="vector", shape=(4, 3))


def settings(arch: str = "mlp", **kw: object) -> ModelSettings:
    base: dict[str, object] = {"architecture": arch, "weights": "none", "mode": "all", "classes": ("a", "b", "c")}
    base["input"] = VEC if arch == "mlp" else IMG
    base.update(kw)
    return ModelSettings(**base)


def tiny_backbone(model: ModelSettings) -> nn.Module:
    """A user factory for the "package.module:function" architecture."""
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Tanh())


def image(mode: str = "RGB", size: tuple[int, int] = (40, 20), color: object = (255, 255, 255)) -> SimpleNamespace:
    return SimpleNamespace(kind="image", payload=b"", image=Image.new(mode, size, color))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("arch", "dim"), [("resnet18", 512), ("resnet50", 2048), ("mobilenet_v3_small", 1024), ("efficientnet_b0", 1280)]
)
def test_torchvision_architectures_get_a_head_sized_to_the_classes(arch: str, dim: int) -> None:
    m = build_model(settings(arch)).eval()
    assert m.embedding_dim == dim and m.head.out_features == 3 and m.classes == ("a", "b", "c")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        emb, out = m.embed(x), m(x)
    assert emb.shape == (2, dim) and out.shape == (2, 3)
    assert torch.allclose(m.head(emb), out)
    assert len(m.blocks()) >= 4
    # Every block is part of the backbone (unfreezing must reach real parameters).
    backbone_params = {id(p) for p in m.backbone.parameters()}
    assert all(id(p) in backbone_params for b in m.blocks() for p in b.parameters())


def test_efficientnet_lite0_imagenet_weights_classify_the_sklearn_flower_as_a_daisy() -> None:
    from sklearn.datasets import load_sample_images

    samples = load_sample_images()
    by_name = {Path(f).name: img for f, img in zip(samples.filenames, samples.images, strict=True)}
    model = imagenet_model("efficientnet_lite0").eval()
    transform = make_transform(InputSettings(kind="image", size=(224, 224), mean=(0.5,) * 3, std=(0.5,) * 3))

    def top5(name: str) -> list[int]:
        x = transform(SimpleNamespace(kind="image", payload=b"", image=Image.fromarray(by_name[name])))
        with torch.inference_mode():
            return model(x[None])[0].topk(5).indices.tolist()

    daisy = model.classes.index("daisy")
    assert daisy == 985
    flower = top5("flower.jpg")
    assert daisy in flower, [model.classes[i] for i in flower]
    # Not a model that calls everything a daisy: the other sample image is a building by a lake.
    assert daisy not in top5("china.jpg")


def test_lite0_imagenet_backbone_is_the_pretrained_one_under_a_new_head() -> None:
    ref = imagenet_model("efficientnet_lite0").eval()
    m = build_model(ModelSettings(architecture="efficientnet_lite0", weights="imagenet", classes=("x", "y"))).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(m.embed(x), ref.embed(x), atol=1e-5)
    assert m.head.out_features == 2 and ref.head.out_features == 1000


def test_torchvision_imagenet_offline_names_the_file_to_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailable) as e:
        build_model(settings("resnet18", weights="imagenet", download_weights=False))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert e.value.path == expected
    assert str(expected) in str(e.value) and "https://download.pytorch.org/models/resnet18-f37072fd.pth" in str(e.value)


def test_torchvision_imagenet_loads_a_placed_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ref = torchvision.models.resnet18(weights=None)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(ref.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    m = build_model(settings("resnet18", weights="imagenet", download_weights=False))
    assert torch.equal(m.backbone.conv1.weight, ref.conv1.weight)


def test_mlp_and_user_factory() -> None:
    m = build_model(settings("mlp", hidden=(8, 6)))
    assert m.embedding_dim == 6 and len(m.blocks()) == 2
    assert m(torch.zeros(5, 4, 3)).shape == (5, 3)
    u = build_model(settings("test_models:tiny_backbone", input=VEC))
    assert u.embedding_dim == 5 and u(torch.zeros(2, 4, 3)).shape == (2, 3)


@pytest.mark.parametrize(
    ("kw", "err", "text"),
    [
        ({"architecture": "resnet9000"}, UnknownArchitecture, "resnet9000"),
        ({"architecture": "mlp", "weights": "imagenet"}, ModelError, "no ImageNet weights"),
        ({"architecture": "resnet18", "input": VEC}, ModelError, "RGB images"),
        ({"architecture": "nosuchpkg.mod:fn"}, ModelError, "cannot import"),
        ({"architecture": "mlp", "weights": "/nonexistent/w.safetensors"}, WeightsFileError, "does not exist"),
    ],
)
def test_bad_model_settings_say_what_is_wrong(kw: dict, err: type[Exception], text: str) -> None:
    with pytest.raises(err, match=text):
        build_model(settings(**kw))


def test_weight_files_round_trip_and_refuse_what_does_not_fit(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    m = build_model(settings("mlp"))
    save_file(m.state_dict(), tmp_path / "w.safetensors")
    torch.save({"state_dict": m.state_dict()}, tmp_path / "w.pt")
    x = torch.randn(3, 4, 3)
    for f in ("w.safetensors", "w.pt"):
        assert torch.allclose(build_model(settings("mlp"), weights=str(tmp_path / f))(x), m(x))
    with pytest.raises(WeightsFileError, match="head has 3 classes, \\[model\\] classes has 2"):
        build_model(settings("mlp", classes=("a", "b")), weights=str(tmp_path / "w.pt"))
    # Pickled objects are never unpickled.
    torch.save({"w": SimpleNamespace(a=1)}, tmp_path / "evil.pt")
    with pytest.raises(WeightsFileError, match="weights-only"):
        build_model(settings("mlp"), weights=str(tmp_path / "evil.pt"))


def test_a_plain_torchvision_state_dict_maps_its_fc_to_the_head(tmp_path: Path) -> None:
    import torchvision

    plain = torchvision.models.resnet18(weights=None, num_classes=3)
    torch.save(plain.state_dict(), tmp_path / "resnet.pth")
    m = build_model(settings("resnet18"), weights=str(tmp_path / "resnet.pth")).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m(x), plain.eval()(x), atol=1e-5)


def _grad(module: nn.Module) -> set[bool]:
    return {p.requires_grad for p in module.parameters()}


def test_freezing_modes() -> None:
    m = build_model(settings("resnet18"))
    apply_mode(m, "feature_extraction")
    assert _grad(m.backbone) == {False} and _grad(m.head) == {True}
    apply_mode(m, "fine_tune", unfreeze_last=2)
    blocks = m.blocks()
    assert _grad(blocks[-1]) == {True} and _grad(blocks[-2]) == {True} and _grad(blocks[-3]) == {False}
    assert _grad(m.head) == {True}
    apply_mode(m, "all")
    assert _grad(m) == {True}
    with pytest.raises(ValueError, match="only 5 blocks"):
        apply_mode(m, "fine_tune", unfreeze_last=6)
    with pytest.raises(ValueError, match="mode must be one of"):
        apply_mode(m, "frozen")


def test_frozen_batchnorm_stays_in_eval_mode_and_keeps_its_statistics() -> None:
    m = build_model(settings("resnet18"))
    apply_mode(m, "fine_tune", unfreeze_last=1)
    set_train_mode(m)
    frozen_bn, trainable_bn = m.backbone.bn1, m.backbone.layer4[0].bn1
    assert not frozen_bn.training and trainable_bn.training and m.head.training
    before = frozen_bn.running_mean.clone(), trainable_bn.running_mean.clone()
    m(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert torch.equal(frozen_bn.running_mean, before[0])
    assert not torch.equal(trainable_bn.running_mean, before[1])
    apply_mode(m, "all")
    set_train_mode(m)
    assert frozen_bn.training


def test_image_transform_resizes_converts_and_normalises() -> None:
    t = make_transform(InputSettings(kind="image", size=(8, 6), channels=3, mean=(0.5,) * 3, std=(0.25,) * 3))
    out = t(image("L", (40, 20), 255))  # grey in, RGB out
    assert out.shape == (3, 8, 6) and torch.allclose(out, torch.full_like(out, 2.0))
    grey = make_transform(InputSettings(kind="image", size=(4, 4), channels=1, mean=(0.0,), std=(1.0,)))
    assert grey(image("RGB", (9, 9), (0, 0, 0))).shape == (1, 4, 4)
    # Encoded bytes work as well as a decoded image.
    import io

    buf = io.BytesIO()
    Image.new("RGB", (10, 10), (255, 0, 0)).save(buf, format="PNG")
    red = t(SimpleNamespace(kind="image", payload=buf.getvalue(), image=None))
    assert red[0].mean() == pytest.approx(2.0) and red[1].mean() == pytest.approx(-2.0)


def test_augmentation_is_train_only_and_off_by_default() -> None:
    spec = InputSettings(kind="image", size=(16, 16), augment=True)
    img = SimpleNamespace(
        kind="image", payload=b"", image=Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3))
    )
    plain = make_transform(spec)(img)
    assert torch.equal(plain, make_transform(spec)(img))
    torch.manual_seed(0)
    assert any(not torch.equal(plain, make_transform(spec, train=True)(img)) for _ in range(5))
    assert torch.equal(make_transform(InputSettings(kind="image", size=(16, 16)), train=True)(img), plain)


def test_vector_transform_checks_the_size() -> None:
    t = make_transform(VEC)
    x = np.arange(12, dtype="<f4")
    out = t(SimpleNamespace(kind="vector", payload=x.tobytes(), image=None))
    assert out.shape == (4, 3) and out[1, 0] == 3.0
    with pytest.raises(TransformError, match="has 5 values, the model takes 12"):
        t(SimpleNamespace(kind="vector", payload=np.zeros(5, "<f4").tobytes(), image=None))


def test_classifier_refuses_a_head_that_does_not_match_the_classes() -> None:
    with pytest.raises(ValueError, match="2 outputs but there are 3 classes"):
        Classifier(nn.Identity(), nn.Linear(4, 2), ("a", "b", "c"), architecture="x")


def _png(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    return img.convert(mode)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA"])
def test_fit_image_is_convert_then_resize_pixel_for_pixel(mode: str) -> None:
    from continual.models.transforms import fit_image

    img = _png(mode, (57, 33))
    for target in ("L", "RGB"):
        expected = img.convert(target).resize((7, 5), Image.Resampling.BILINEAR)
        got = fit_image(img, target, (7, 5))
        assert got.mode == target and np.array_equal(np.asarray(got), np.asarray(expected)), (mode, target)


def test_stored_images_over_the_pixel_cap_fail_naming_the_sample_before_decoding() -> None:
    import io
    import struct
    import zlib

    from continual.config import IngestSettings
    from continual.models.transforms import BadSample, transform_stored

    buf = io.BytesIO()
    _png("RGB", (20, 10)).save(buf, format="PNG")
    payload = buf.getvalue()
    capped = make_transform(IMG, max_pixels=199)
    with pytest.raises(TransformError, match=r"20x10 = 200 pixels exceeds ingest\.max_image_pixels = 199"):
        capped(SimpleNamespace(kind="image", payload=payload, image=None))
    with pytest.raises(BadSample) as e:
        transform_stored(SimpleNamespace(seq=7, external_id="cam/7.png", kind="image", payload=payload), capped)
    assert (e.value.seq, e.value.external_id) == (7, "cam/7.png") and "max_image_pixels = 199" in str(e.value)
    assert make_transform(IMG, max_pixels=200)(SimpleNamespace(kind="image", payload=payload, image=None)).shape == (
        3,
        32,
        32,
    )
    # A bomb's header (no pixel data behind it) is refused from the header at the default cap.
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    ihdr = struct.pack(">IIBBBBB", 5000, 5000, 8, 0, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    cap = IngestSettings().max_image_pixels
    with pytest.raises(TransformError, match=f"25000000 pixels exceeds ingest.max_image_pixels = {cap}"):
        make_transform(IMG)(SimpleNamespace(kind="image", payload=bomb, image=None))
