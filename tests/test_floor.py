import json
import math

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers import (GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3MoeConfig, Qwen3MoeForCausalLM)

from nested_reft.cli import main
from nested_reft.floor import (LayerAttention, Machine, ModelShape, copy_bandwidth, layer_params_used,
                               measure_machine, model_shape, product_shapes, rollout_floor)
from nested_reft.kv_cache import decode_cache


def tiny(layers=4, hidden=32, inter=64, heads=4, kv_heads=2, vocab=100, attn="sdpa"):
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=True)
    config._attn_implementation = attn
    return Qwen2ForCausalLM(config).eval()


def test_model_shape_counts_one_layer_and_the_head():
    shape = model_shape(tiny())
    h, kv, i = 32, 2 * 8, 64
    one_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h  # q, k, v (biased), o, MLP, 2 norms
    full = LayerAttention(span=math.inf, flops=2 * 4 * (8 + 8), kv_elements=2 * 2 * 8)  # 4 heads, 2 KV heads of 8
    assert shape == ModelShape(layers=4, layer_params=one_layer, head_params=100 * h, attention=(full,) * 4,
                               dtype_bytes=4)


def test_untied_heads_and_bf16_weights():
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    shape = model_shape(model.to(torch.bfloat16))
    assert shape.head_params == 100 * 32 and shape.dtype_bytes == 2


def test_product_shapes_are_a_layers_linear_maps_and_the_head():
    h, kv, i = 32, 16, 64
    assert sorted(product_shapes(tiny())) == sorted([(h, h, 2 * 4), (h, kv, 2 * 4), (h, i, 2 * 4), (i, h, 4),
                                                     (h, 100, 1)])  # q and o, k and v, gate and up, down, head
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4))  # Conv1D, no intermediate_size
    assert sorted(product_shapes(gpt2)) == sorted([(32, 96, 2), (32, 32, 2), (32, 128, 2), (128, 32, 2), (32, 50, 1)])
    opt = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                   num_attention_heads=4, word_embed_proj_dim=32))
    assert (32, 64, 2) in product_shapes(opt) and (64, 32, 2) in product_shapes(opt)
    assert measure_machine(gpt2).flops_per_s > 0 and model_shape(gpt2).attention[0].kv_elements == 2 * 4 * 8


#: 10 full-attention layers of 2 heads of 4 (QK^T and PV: 2 x 2 x (4 + 4) FLOPs per position) and 1 KV head.
ATTENTION = (LayerAttention(span=math.inf, flops=4 * 2 * 4, kv_elements=2 * 4),) * 10


def test_floor_sums_a_roofline_over_the_prefill_and_decode_steps():
    shape = ModelShape(layers=10, layer_params=1000, head_params=500, attention=ATTENTION, dtype_bytes=2)
    machine = Machine(flops_per_s=1e6, bytes_per_s=1e5)
    f = rollout_floor(shape, machine, rows=3, prompt_len=5, new_tokens=4)
    per_token = 2 * (10 * 1000 + 500)  # matrix FLOPs
    attn = 4 * 10 * 2 * 4  # per token and attended position
    prefill = 15 * (per_token - 2 * 500 + attn * 3) + 3 * 2 * 500  # 15 tokens attending over (5 + 1) / 2
    # positions on average; the head at each row's last position only
    decode = sum(3 * (per_token + attn * c) for c in (6, 7, 8))
    assert f.compute_s == pytest.approx((prefill + decode) / 1e6)
    weights = (10 * 1000 + 500) * 2
    assert f.weights_s == pytest.approx(4 * weights / 1e5)  # read once per pass: prefill + 3 decode steps
    kv = 10 * 2 * 1 * 4 * 2  # bytes per row and cached position: layers x (K, V) x kv heads x head dim x 2 bytes
    assert f.kv_s == pytest.approx(3 * kv * (6 + 7 + 8) / 1e5)
    steps = [max(prefill / 1e6, weights / 1e5)] + [max(3 * (per_token + attn * c) / 1e6, (weights + 3 * kv * c) / 1e5)
                                                   for c in (6, 7, 8)]
    assert f.floor_s == pytest.approx(sum(steps))


def test_a_nested_floor_drops_the_skipped_layers_but_not_the_head():
    shape = ModelShape(layers=10, layer_params=1000, head_params=500, attention=ATTENTION, dtype_bytes=4)
    machine = Machine(1e9, 1e9)
    full, nested = (rollout_floor(shape, machine, 2, 3, 5, skipped=u) for u in (0, 4))
    assert nested.weights_s == pytest.approx(full.weights_s * (6 * 1000 + 500) / (10 * 1000 + 500))
    assert nested.kv_s == pytest.approx(full.kv_s * 6 / 10)
    assert nested.floor_s < full.floor_s


def decode_step_flops(model, rows: int, prompt_len: int) -> tuple[float, float]:
    """(the floor's arithmetic for one KV-cached decode step at context prompt_len + 1; torch's FLOP counter over
    that step of the real model, plus 2 per row for each bias and norm weight, which the floor counts as
    parameters). Eager attention, so attention's two products are counted too."""
    ids = torch.randint(1, model.config.vocab_size, (rows, prompt_len))
    cache = decode_cache(model, prompt_len + 2)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, cache=cache)
        with FlopCounterMode(display=False) as counter:
            model(input_ids=ids[:, :1], use_cache=True, cache=cache)
    machine, shape = Machine(1.0, float("inf")), model_shape(model)  # seconds == FLOPs
    one_step = (rollout_floor(shape, machine, rows, prompt_len, 2).compute_s
                - rollout_floor(shape, machine, rows, prompt_len, 1).compute_s)
    vectors = sum(p.numel() for p in model.model.layers.parameters() if p.ndim == 1)
    return one_step, counter.get_total_flops() + 2 * rows * vectors


def test_decode_step_arithmetic_matches_torch_flop_counter():
    """Independent reference: torch's FLOP counter over one real KV-cached decode step of the model."""
    floor, counted = decode_step_flops(tiny(layers=3, hidden=64, inter=128, vocab=50, attn="eager"), 4, 6)
    assert floor == pytest.approx(counted)


def test_kv_bytes_match_the_engine_cache():
    model = tiny()
    shape = model_shape(model)
    rows, prompt_len = 2, 5
    cache = decode_cache(model, prompt_len + 1)
    with torch.no_grad():
        model(input_ids=torch.randint(1, 100, (rows, prompt_len)), use_cache=True, cache=cache)
    cached = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)  # read by the next step
    kv_s = rollout_floor(shape, Machine(1.0, 1.0), rows, prompt_len, 2).kv_s  # one decode step, bytes/s = 1
    assert kv_s == pytest.approx(cached * (prompt_len + 1) / prompt_len)  # that step also reads its own token


def test_measured_rates_are_positive_and_plausible():
    machine = measure_machine(tiny())
    assert 1e8 < machine.flops_per_s < 1e16 and 1e8 < machine.bytes_per_s < 1e14
    assert copy_bandwidth(torch.device("cpu"), megabytes=8, repeats=1) > 1e8


def test_bench_floor_shares_are_below_one(capsys):
    rc = main(["bench", "--hidden-size", "32", "--skip-ratio", "0.15", "--batch-size", "2", "--num-generations", "2",
               "--max-new-tokens", "4", "--repeats", "1", "--warmup", "0", "--compare-generate", "--floor", "--json"])
    assert rc == 0
    (row,) = json.loads(capsys.readouterr().out)
    for key in ("full_floor_share", "nested_floor_share", "generate_floor_share"):
        assert 0 < row[key] < 1, key
    assert set(row["full_floor"]) == {"compute_s", "weights_s", "kv_s", "floor_s"}
    assert row["nested_floor_s"] < row["full_floor"]["floor_s"]


def test_bench_floor_prints_its_line(capsys):
    assert main(["bench", "--hidden-size", "32", "--skip-ratio", "0.15", "--batch-size", "1", "--num-generations",
                 "2", "--max-new-tokens", "3", "--repeats", "1", "--warmup", "0", "--floor"]) == 0
    out = capsys.readouterr().out
    assert "share of the floor reached: full model" in out and "KV-cache reads" in out


def test_floor_is_refused_in_step_mode(capsys):
    assert main(["bench", "--mode", "step", "--floor"]) == 2
    assert "--floor are rollout-mode measurements" in capsys.readouterr().err


def test_the_prefill_runs_each_distinct_prompt_once_and_the_head_at_its_last_position():
    shape = ModelShape(layers=10, layer_params=1000, head_params=500, attention=ATTENTION, dtype_bytes=2)
    machine = Machine(flops_per_s=1.0, bytes_per_s=float("inf"))  # seconds == FLOPs
    prefill = rollout_floor(shape, machine, rows=8, prompt_len=5, new_tokens=1, prompts=2).compute_s
    attn = 4 * 10 * 2 * 4 * 3  # per token: every layer attends over (5 + 1) / 2 positions on average
    assert prefill == pytest.approx(2 * 5 * (2 * 10 * 1000 + attn) + 2 * 2 * 500)
    assert prefill < rollout_floor(shape, machine, rows=8, prompt_len=5, new_tokens=1).compute_s  # every row


def tiny_moe(attn="eager"):
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=50, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_experts=8, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8)
    config._attn_implementation = attn
    model = Qwen3MoeForCausalLM(config).eval()
    model.set_experts_implementation("eager")  # torch's FLOP counter has no formula for the default grouped_mm
    return model


def test_moe_shape_counts_the_routed_experts_apart():
    shape = model_shape(tiny_moe())
    experts = 8 * (2 * 16 * 32 + 32 * 16)  # E x (fused gate/up [2I, H] + down [H, I])
    assert (shape.experts, shape.experts_per_token, shape.expert_params) == (8, 2, experts)
    assert layer_params_used(shape) == shape.layer_params - experts + experts * 2 / 8  # one token: k of E
    assert layer_params_used(shape, tokens=1000) == pytest.approx(shape.layer_params)  # many tokens: all of them
    assert layer_params_used(shape, tokens=2) == pytest.approx(shape.layer_params - experts * (1 - 2 / 8) ** 2)
    assert (16, 32, 2 * 2) in product_shapes(tiny_moe())  # down: k experts per token in each of 2 layers


def test_moe_decode_step_arithmetic_matches_torch_flop_counter():
    """A routed token runs k of the E experts: the decode step's counted FLOPs are those of the k, not all E."""
    floor, counted = decode_step_flops(tiny_moe(), 4, 6)
    assert floor == pytest.approx(counted)


def tiny_sliding(attn="eager"):
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                         max_window_layers=1)  # layer 0 full, layers 1-2 a 4-position window
    config._attn_implementation = attn
    return Qwen2ForCausalLM(config).eval()


def test_sliding_window_layers_attend_and_read_at_most_their_window():
    model = tiny_sliding()
    shape = model_shape(model)
    assert [a.span for a in shape.attention] == [math.inf, 4, 4]
    rows, prompt_len = 2, 7
    cache = decode_cache(model, prompt_len + 2)
    with torch.no_grad():
        model(input_ids=torch.randint(1, 50, (rows, prompt_len)), use_cache=True, cache=cache)
    cached = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)  # what the next step reads
    kv_s = rollout_floor(shape, Machine(1.0, 1.0), rows, prompt_len, 2).kv_s
    per_position = 2 * 2 * 8 * 4  # K and V x kv heads x head dim x 4 bytes, per row and layer
    assert kv_s == pytest.approx(cached + rows * 3 * per_position)  # each layer also reads the step's own token
    assert kv_s == pytest.approx(rows * per_position * (8 + 4 + 4))  # context 8; the windows keep 4
    floor, counted = decode_step_flops(model, rows, prompt_len)  # attention over at most the window
    assert floor == pytest.approx(counted)


def test_bench_floor_of_a_moe_model_directory(tmp_path, capsys):
    tiny_moe(attn="sdpa").save_pretrained(tmp_path / "moe")
    assert main(["bench", "--model", str(tmp_path / "moe"), "--skip-ratio", "0.5", "--border", "0",
                 "--batch-size", "2", "--num-generations", "2", "--max-new-tokens", "3", "--repeats", "1",
                 "--warmup", "0", "--floor", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert 0 < row["full_floor_share"] < 1 and row["nested_floor_s"] < row["full_floor"]["floor_s"]


def test_a_prefill_longer_than_a_window_attends_over_the_window_on_average():
    shape = ModelShape(layers=2, layer_params=0, head_params=0, dtype_bytes=1,
                       attention=(LayerAttention(math.inf, 1, 1), LayerAttention(4, 1, 1)))
    machine = Machine(flops_per_s=1.0, bytes_per_s=float("inf"))
    prefill = rollout_floor(shape, machine, rows=1, prompt_len=6, new_tokens=1).compute_s
    assert prefill == pytest.approx(sum(range(1, 7)) + sum(min(i, 4) for i in range(1, 7)))  # 21 + 16 positions


def test_recurrent_and_kv_sharing_layers_take_their_spans_from_the_cache_and_the_config():
    from conftest import tiny_hybrid

    bamba = model_shape(tiny_hybrid("bamba")).attention
    assert [a.span for a in bamba] == [0, math.inf, 0, math.inf] and bamba[0].kv_elements == 0  # Mamba: no KV
    gemma4 = transformers.AutoModelForCausalLM.from_config(transformers.Gemma4TextConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_kv_shared_layers=2, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]))
    attention = model_shape(gemma4).attention
    assert attention[2:] == attention[:2]  # layers 2-3 read layers 0-1's KV
    assert [a.span for a in attention[:2]] == [4, math.inf]
    assert attention[1].kv_elements == 2 * 2 * 512 and attention[1].flops == 2 * 4 * 2 * 512  # full: head_dim 512


def test_multi_head_latent_attention_reads_its_compressed_cache():
    """DeepSeek-V3 caches a latent (kv_lora_rank) and a rotary key (qk_rope_head_dim) per position, not K and V
    per head; its attention's products are qk_head_dim and v_head_dim wide."""
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        vocab_size=50, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16)).eval()
    shape = model_shape(model)
    assert shape.attention[0] == LayerAttention(math.inf, 2 * 4 * ((16 + 8) + 16), 16 + 8)
    assert (shape.experts, shape.experts_per_token) == (8, 2)
    rows, prompt_len = 2, 5
    cache = decode_cache(model, prompt_len + 1)
    with torch.no_grad():
        model(input_ids=torch.randint(1, 50, (rows, prompt_len)), use_cache=True, cache=cache)
    cached = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    kv_s = rollout_floor(shape, Machine(1.0, 1.0), rows, prompt_len, 2).kv_s
    assert kv_s == pytest.approx(cached * (prompt_len + 1) / prompt_len)


def test_transposed_fused_experts_are_measured_in_their_own_orientation():
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(
        vocab_size=50, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2))
    assert model.model.layers[0].mlp.experts.is_transposed  # gate_up_proj [E, H, 2I], applied as x @ W
    shapes = {(k, n): count for k, n, count in product_shapes(model)}
    assert shapes[(32, 2 * 24)] == 2 * 2 and shapes[(24, 32)] == 2 * 2  # k experts per token, 2 layers
