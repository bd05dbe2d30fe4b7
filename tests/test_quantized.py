"""Value-norm features whatever the output projection is: bitsandbytes 8-bit and 4-bit, accelerate offload.

The plain model's features are the reference: offloaded layers give the same numbers (the weights are the
same, read through the layer's own forward), quantized layers the same within quantization error, and the
top regions of every reasoning step agree.
"""

import importlib.util

import pytest
import torch

from hf_vattr import AttributionStreamer, LinearEstimator, SpanAttribution, TokenAttribution
from hf_vattr.capture import output_norms, value_norm_weights, value_norm_weights_from_module
from hf_vattr.toy import load_toy_model, make_examples, prompt_messages, toy_checkpoint_path, toy_estimator_path, toy_regions

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install bitsandbytes, or the "
                                                    "'test' extra): its 8-bit and 4-bit layers cannot be loaded")
SEEDS = (7, 11, 23)


def _stream(model, processor, seed: int):
    """(token features (T, L, H, K), [(span text, top-3 regions)]) of one toy example with the shipped estimator."""
    estimator = LinearEstimator.from_pretrained(toy_estimator_path())
    example = make_examples(1, seed=seed)[0]
    prompt = processor.apply_chat_template(prompt_messages(example), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[example.image], return_tensors="pt")
    regions = toy_regions(model, inputs, [example.image], estimator)
    streamer = AttributionStreamer(model, processor, estimator=estimator, images=[example.image], regions=regions,
                                   keep_features=True)
    events = list(streamer.generate(**inputs, max_new_tokens=96))
    tokens = torch.stack([e.features for e in events if isinstance(e, TokenAttribution)])
    spans = [(e.text, e.top_regions(3)) for e in events if isinstance(e, SpanAttribution)]
    return tokens, spans


_PLAIN: dict = {}


def _plain(seed: int):
    if not _PLAIN:
        _PLAIN["model"] = load_toy_model()
    if seed not in _PLAIN:
        _PLAIN[seed] = _stream(*_PLAIN["model"], seed)
    return _PLAIN[seed]


def _load(**kwargs):
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    folder = toy_checkpoint_path()
    model = Qwen3VLForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa", **kwargs).eval()
    return model, AutoProcessor.from_pretrained(folder)


def _top1(spans):
    return [(text, top[0]) for text, top in spans]


# ----------------------------------------------------------------------------- the two routes on plain layers


@pytest.mark.parametrize("bias", [False, True])
def test_module_route_equals_the_gram_route_on_a_plain_linear(bias):
    torch.manual_seed(0)
    num_heads, num_kv, dim, hidden = 8, 2, 16, 96
    projection = torch.nn.Linear(num_heads * dim, hidden, bias=bias)
    if bias:
        torch.nn.init.normal_(projection.bias, std=3.0)  # a bias that would dominate if it were not subtracted
    value = torch.randn(2, num_kv, 40, dim)
    positions = torch.stack([torch.arange(5, 30), torch.arange(10, 35)])
    gram = value_norm_weights(value, positions, projection.weight, num_heads)
    via_forward = value_norm_weights_from_module(value, positions, projection, num_heads)
    assert via_forward.shape == gram.shape == (2, num_heads, 25)
    torch.testing.assert_close(via_forward, gram, atol=1e-5, rtol=1e-5)
    assert torch.equal(output_norms(value, positions, projection, num_heads), gram)  # plain: today's route, as is


def test_module_route_serves_any_other_layer_and_bounds_its_blocks(monkeypatch):
    """A layer that is not a plain Linear (here a subclass holding its weight in int8 with a scale) is called,
    never read; small probe blocks give the same norms as one block."""
    import hf_vattr.capture.value_norms as capture

    class Int8Linear(torch.nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.scale = weight.abs().amax(1, keepdim=True) / 127
            self.weight = torch.nn.Parameter((weight / self.scale).round().to(torch.int8), requires_grad=False)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x @ (self.weight.float() * self.scale).T

    torch.manual_seed(1)
    plain = torch.nn.Linear(4 * 8, 24, bias=False)
    quantized = Int8Linear(plain.weight.detach())
    value = torch.randn(1, 4, 20, 8)
    positions = torch.arange(3, 15)[None]
    reference = value_norm_weights(value, positions, quantized.weight.float() * quantized.scale, 4)
    torch.testing.assert_close(output_norms(value, positions, quantized, 4), reference, atol=1e-5, rtol=1e-5)
    assert quantized.calls == 2  # the zero row, then one block
    monkeypatch.setattr(capture, "_PROBE_ELEMENTS", 4 * (32 + 24) * 5)  # five tokens per block
    quantized.calls = 0
    torch.testing.assert_close(output_norms(value, positions, quantized, 4), reference, atol=1e-5, rtol=1e-5)
    assert quantized.calls == 1 + 3
    # the int8 matrix read as weights would be far off: that is what the Gram route must never see
    assert not torch.allclose(value_norm_weights(value, positions, quantized.weight, 4), reference, rtol=0.5)


# ----------------------------------------------------------------------------- offloaded layers


def test_disk_offloaded_layers_give_the_plain_features(tmp_path):
    """Half the decoder layers on disk, the rest on CPU (accelerate): their o_proj.weight sits on meta outside
    the forward; features equal the plain model's."""
    model, _ = load_toy_model()
    layers = model.config.text_config.num_hidden_layers
    device_map = {"model.visual": "cpu", "model.language_model.embed_tokens": "cpu",
                  "model.language_model.norm": "cpu", "model.language_model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.language_model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(layers)})
    offloaded, processor = _load(device_map=device_map, offload_folder=str(tmp_path / "offload"))
    assert offloaded.model.language_model.layers[1].self_attn.o_proj.weight.device.type == "meta"
    for seed in SEEDS[:2]:
        features, spans = _stream(offloaded, processor, seed)
        plain_features, plain_spans = _plain(seed)
        torch.testing.assert_close(features, plain_features, atol=1e-6, rtol=1e-5)
        assert spans == plain_spans


def test_cpu_offloaded_model_gives_the_plain_features():
    from accelerate import cpu_offload

    model, processor = load_toy_model()
    for layer in model.model.language_model.layers:  # weights kept in a CPU map, on meta outside each forward
        cpu_offload(layer, execution_device=torch.device("cpu"))
    assert model.model.language_model.layers[0].self_attn.o_proj.weight.device.type == "meta"
    features, spans = _stream(model, processor, SEEDS[0])
    plain_features, plain_spans = _plain(SEEDS[0])
    torch.testing.assert_close(features, plain_features, atol=1e-6, rtol=1e-5)
    assert spans == plain_spans


# ----------------------------------------------------------------------------- bitsandbytes


def _bnb_config(bits: int):
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)


@needs_bnb
@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
@pytest.mark.parametrize("bits, tolerance", [(8, 0.03), (4, 0.12)])
def test_bitsandbytes_layer_norms_match_the_float_weights(bits, tolerance):
    """Layer by layer, on the same values: the quantized o_proj's norms against the float o_proj's."""
    import bitsandbytes as bnb

    quantized, _ = _load(quantization_config=_bnb_config(bits))
    plain, _ = load_toy_model()
    layer = quantized.model.language_model.layers[0].self_attn
    expected = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    assert isinstance(layer.o_proj, expected)
    text = plain.config.text_config
    num_heads, num_kv = text.num_attention_heads, text.num_key_value_heads
    torch.manual_seed(0)
    value = torch.randn(1, num_kv, 30, text.head_dim)
    positions = torch.arange(2, 28)[None]
    for q_layer, p_layer in zip(quantized.model.language_model.layers, plain.model.language_model.layers):
        got = output_norms(value, positions, q_layer.self_attn.o_proj, num_heads)
        want = output_norms(value, positions, p_layer.self_attn.o_proj, num_heads)
        assert ((got - want).norm() / want.norm()).item() < tolerance


@needs_bnb
@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
@pytest.mark.parametrize("bits, tolerance", [(8, 0.03), (4, 0.12)])
def test_bitsandbytes_model_features_and_top_regions_match_the_plain_model(bits, tolerance):
    """Today the int8 / packed uint8 matrix was read as W_O (top score 23594 nats, answer regions [15, 0, 1]);
    through the layer's forward the features are the plain model's within quantization error and every
    reasoning step's top regions agree."""
    quantized, processor = _load(quantization_config=_bnb_config(bits))
    for seed in SEEDS:
        features, spans = _stream(quantized, processor, seed)
        plain_features, plain_spans = _plain(seed)
        assert [text for text, _ in spans] == [text for text, _ in plain_spans]
        assert features.shape == plain_features.shape
        assert ((features - plain_features).norm() / plain_features.norm()).item() < tolerance
        assert _top1(spans) == _top1(plain_spans)
        if bits == 8:
            assert spans == plain_spans  # the top three, in order


@needs_bnb
def test_cli_collects_from_a_model_loaded_in_8bit(tmp_path):
    """`--quantization 8bit` loads the model through bitsandbytes and the collection's features stay those of the
    plain model within quantization error (the value-norm weights go through the quantized layer's forward)."""
    from safetensors.torch import load_file

    from hf_vattr.commands.cli import main

    def collect(out, *extra):
        assert main(["collect", "--toy", "1", "--out", str(out), "--max-new-tokens", "24", "--k", "4",
                     "--num-subsets", "2", "--quiet", *extra]) == 0
        (example,) = sorted((out / "examples").glob("*.safetensors"))
        return load_file(example)

    plain, quantized = collect(tmp_path / "plain"), collect(tmp_path / "q8", "--quantization", "8bit")
    shared = sorted(name for name in plain if plain[name].is_floating_point() and name in quantized
                    and plain[name].shape == quantized[name].shape and "feature" in name)
    assert shared, sorted(plain)
    for name in shared:
        relative = ((quantized[name] - plain[name]).abs().max() / plain[name].abs().max()).item()
        assert relative < 0.05, (name, relative)


def test_cli_quantization_without_bitsandbytes_is_one_line_before_loading(tmp_path, monkeypatch, capsys):
    import builtins

    from hf_vattr.commands.cli import main

    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    assert main(["collect", "--toy", "1", "--out", str(tmp_path / "gt"), "--quantization", "4bit", "--quiet"]) == 2
    assert "bitsandbytes is not installed" in capsys.readouterr().err
    assert not (tmp_path / "gt").exists()
