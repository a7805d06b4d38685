"""The one-graph training step on `transformers` models, called the ways people call them.

Each case: three AdamW steps of compile_train_step equal three torch.optim.AdamW steps on the eager
reference (frozen parts restored after each step, Channels gradients masked): losses and every parameter
and buffer to rtol 1e-4, atol 1e-8; untrained parameters bit-identical to their initial values; and the
same three steps through sparsecc.save -> sparsecc.load -> Runner.train_step, from a save made before
training. The models run in float64: in float32, Adam turns the rounding differences of a different
summation order into parameter differences of ~1e-4 wherever a gradient is near eps (BatchNorm'd convs),
which would force a tolerance loose enough to hide a real error.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import sparsecc
from conftest import channel_mask
from sparsecc.train_step import call_model, model_loss

transformers = pytest.importorskip("transformers")
C, US = sparsecc.Channels, sparsecc.UpdateScheme
TOL = {"rtol": 1e-4, "atol": 1e-8}


def causal_lm_loss(out, labels):
    logits = out.logits if hasattr(out, "logits") else out[0]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


def classification_loss(out, labels):
    return F.cross_entropy(out.logits, labels)


def tokens(batch=2, seq=12, vocab=64, pad=3):
    """Token ids, a right-padded attention mask (the second row ends with `pad` pads), labels -100 there."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - pad:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def images(batch=2, size=32, classes=5):
    g = torch.Generator().manual_seed(2)
    return torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64), torch.randint(0, classes, (batch,), generator=g)


def llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
                                  eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)          # lm_head.weight is transformer.wte.weight


def bert():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg)


def vit():
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64, num_labels=5)
    return transformers.ViTForImageClassification(cfg)


def mobilenet_v2():
    cfg = transformers.MobileNetV2Config(image_size=32, depth_multiplier=0.25, num_labels=5,
                                           classifier_dropout_prob=0.0)
    return transformers.MobileNetV2ForImageClassification(cfg)


def convnext():
    cfg = transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1], num_labels=5)
    return transformers.ConvNextForImageClassification(cfg)


def resnet():
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                    num_labels=5)
    return transformers.ResNetForImageClassification(cfg)


def case(name):
    """(model, x, y, loss_fn, scheme) of a case: PockEngine-style schemes (the last blocks' biases and norms,
    Channels on one weight of the last block, the head)."""
    torch.manual_seed(0)
    ids, mask, labels = tokens()
    if name == "llama-plain":                 # model(input_ids): no mask, our loss
        return llama(), ids, ids, causal_lm_loss, US({
            "model.layers.1.*norm.weight": "full", "model.layers.1.mlp.down_proj.weight": C(0.25),
            "model.norm.weight": "full", "lm_head.weight": C(0.5, dim="out", select="magnitude")})
    if name == "llama-labels":                # keywords, padded mask, labels=: the model's own loss
        return llama(), {"input_ids": ids, "attention_mask": mask, "labels": labels}, None, None, US({
            "model.layers.1.self_attn.o_proj.weight": C(0.25), "model.layers.*.post_attention_layernorm.*": "full"})
    if name == "gpt2-plain":                  # tied head, ModelOutput
        return gpt2(), ids, ids, causal_lm_loss, US({
            "transformer.h.1.*.bias": "full", "transformer.h.1.mlp.c_fc.weight": C(0.25),
            "transformer.ln_f.*": "full"})
    if name == "gpt2-tuple":                  # return_dict=False, labels=, padded mask; the tied head trains
        return gpt2(), {"input_ids": ids, "attention_mask": mask, "labels": labels, "return_dict": False}, None, \
            None, US({"lm_head.weight": C(0.25), "transformer.h.1.ln_*": "full"})
    if name == "bert-classifier":             # sequence classification with the model's own loss
        return bert(), {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
                        "labels": torch.tensor([0, 2])}, None, None, US({
            "bert.encoder.layer.1.*.bias": "full", "bert.encoder.layer.1.intermediate.dense.weight": C(0.25),
            "classifier.*": "full", "bert.pooler.*": "full"})
    pixels, classes = images()
    if name == "vit":
        return vit(), pixels, classes, classification_loss, US({
            "vit.layers.1.*.bias": "full", "vit.layers.1.mlp.fc2.weight": C(0.25),
            "vit.layernorm.*": "full", "classifier.*": "full"})
    if name == "mobilenet_v2":                # BatchNorm in training mode, labels=
        return mobilenet_v2(), {"pixel_values": pixels, "labels": classes}, None, None, US({
            "mobilenet_v2.conv_1x1.*": "full", "mobilenet_v2.layer.15.*.normalization.*": "full",
            "mobilenet_v2.layer.15.reduce_1x1.convolution.weight": C(0.25), "classifier.*": "full"})
    if name == "convnext":
        return convnext(), pixels, classes, classification_loss, US({
            "convnext.encoder.stages.3.layers.0.pwconv2.*": "full",
            "convnext.encoder.stages.3.layers.0.pwconv1.weight": C(0.25), "classifier.*": "full"})
    if name == "resnet":
        return resnet(), pixels, classes, classification_loss, US({
            "resnet.encoder.stages.3.layers.0.layer.2.*": "full",
            "resnet.encoder.stages.3.layers.0.layer.1.convolution.weight": C(0.5, dim="out"),
            "classifier.*": "full"})
    raise KeyError(name)


CASES = ["llama-plain", "llama-labels", "gpt2-plain", "gpt2-tuple", "bert-classifier", "vit", "mobilenet_v2",
         "convnext", "resnet"]


def reference(model, x, y, loss_fn, scheme, k=3):
    """torch.optim.AdamW on the eager reference gradients (Channels masked); frozen parts restored."""
    params = dict(model.named_parameters(remove_duplicate=False))      # a tied tensor under each name
    rules = scheme.resolve(params)
    keep = {n: channel_mask(p, rules[n]) for n, p in params.items() if isinstance(rules[n], C)}
    original = {n: p.detach().clone() for n, p in params.items()}
    trained = {id(p): p for n, p in params.items() if rules[n] != "frozen"}
    opt = torch.optim.AdamW(list(trained.values()), **ADAMW)
    losses = []
    for _ in range(k):
        opt.zero_grad(set_to_none=True)
        out = call_model(model, x)
        loss = model_loss(out) if loss_fn is None else loss_fn(out, y)
        loss.backward()
        for n, m in keep.items():
            params[n].grad *= m
        opt.step()
        with torch.no_grad():
            for n, m in keep.items():
                params[n].copy_(torch.where(m, params[n], original[n]))
        losses.append(loss.detach())
    return torch.stack(losses)


ADAMW = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.05}


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_three_adamw_steps_equal_torch_optim_in_process_and_through_an_artifact(name, tmp_path):
    model, x, y, loss_fn, scheme = case(name)
    model.to(torch.float64)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = copy.deepcopy(model)
    ref_losses = reference(ref, x, y, loss_fn, scheme)
    example = (x,) if y is None else (x, y)
    step = sparsecc.compile_train_step(model, loss_fn, optimizer=sparsecc.AdamW(**ADAMW), update=scheme,
                                       example_inputs=example, executor="eager")
    path = sparsecc.save(step, tmp_path / f"{name}.sparsecc")
    losses = torch.stack([step(*example) for _ in range(3)])
    runner = sparsecc.load(path)
    runner_losses = torch.stack([runner.train_step(*example) for _ in range(3)])

    torch.testing.assert_close(losses, ref_losses, **TOL)
    torch.testing.assert_close(runner_losses, ref_losses, **TOL)
    rules = step.rules
    trained = runner.parameters()
    for (n, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, r, **TOL, msg=lambda m: f"{name} {n}: {m}")
        torch.testing.assert_close(trained[n], r, **TOL, msg=lambda m: f"{name} {n} (artifact): {m}")
        if rules[n] == "frozen":
            assert torch.equal(p, initial[n]) and torch.equal(trained[n], initial[n]), f"{n} is frozen but changed"
        elif isinstance(rules[n], C):
            outside = ~channel_mask(p, rules[n])
            assert torch.equal(p[outside], initial[n][outside]), f"{n} changed outside its Channels slice"
    for (n, b), (_, r) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, r, **TOL, msg=lambda m: f"{name} buffer {n}: {m}")


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc(x)
        if y.sum() > 0:                       # a data-dependent branch: Dynamo cannot put it in one graph
            y = y * 2
        return y


def test_a_graph_break_is_a_config_error_naming_the_model_line():
    model = DataDependent()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with pytest.raises(sparsecc.ConfigError) as err:
        sparsecc.compile_train_step(model, F.cross_entropy, optimizer=sparsecc.SGD(lr=0.1), example_inputs=(x, y))
    message = str(err.value)
    assert f"{__file__}:" in message and "if y.sum() > 0" in message, message
    assert "backend='sparsecc'" in message                 # what to do instead
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_loss_fn_none_without_labels_says_what_to_pass():
    model, x, _, _, scheme = case("llama-plain")
    with pytest.raises(sparsecc.ConfigError, match="labels="):
        sparsecc.compile_train_step(model, None, optimizer=sparsecc.SGD(lr=0.1), example_inputs=(x,),
                                    executor="eager")
