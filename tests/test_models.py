import pytest
import torch
from torch import nn

from samkit.experiments.models import build_model, count_parameters, list_models


@pytest.mark.parametrize(
    "name,expected",
    # Greydanus (arXiv 2011.14439): CNN ~5.2k, GRU ~5.1k, MLP 40-100-100-10.
    [("cnn", 5210), ("gru", 5134), ("mlp", 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10)],
)
def test_paper_parameter_counts(name, expected):
    assert count_parameters(build_model(name)) == expected


@pytest.mark.parametrize("name", sorted(list_models()))
@pytest.mark.parametrize("in_len,classes", [(40, 10), (64, 10), (40, 3)])
def test_output_shape_for_each_input_length(name, in_len, classes):
    torch.manual_seed(0)
    model = build_model(name, in_len=in_len, num_classes=classes)
    out = model(torch.randn(5, in_len))
    assert out.shape == (5, classes)
    assert torch.isfinite(out).all()


def test_cnn_head_matches_paper_shape():
    m = build_model("cnn")
    assert m.linear.in_features == 125 and m.conv1.out_channels == 25


def test_resnet_has_batchnorm():
    assert any(isinstance(m, nn.BatchNorm1d) for m in build_model("resnet").modules())


def test_unknown_model_and_bad_kwargs_raise():
    with pytest.raises(ValueError, match="Invalid model value: 'vit'"):
        build_model("vit")
    with pytest.raises(ValueError, match="cnn"):
        build_model("cnn", nonsense=3)
    with pytest.raises(ValueError, match="in_len"):
        build_model("cnn", in_len=2)


def test_same_seed_same_init():
    torch.manual_seed(3)
    a = build_model("gru")
    torch.manual_seed(3)
    b = build_model("gru")
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
