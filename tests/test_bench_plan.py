"""bench/plan.py: the per-parameter memory items against the bytes torch's dtypes and optimizers
(and bitsandbytes' 8-bit AdamW) really hold, the activation formula against what torch saves, how
the plan moves with the batch, the length, checkpointing, packing and the usable memory, and the
--validate path against a CPU measurement on a small model."""
import json

import pytest
import torch

from bench import plan
from metarm_fast.model import build_tiny_llama, compute_rewards

GB = 1e9


def _args(*extra):
    a = plan.build_parser().parse_args(["--model", "llama-2-7b", "--gpu", "a100-80g", "--batch", "16", "--max-length", "1024", *extra])
    a.meta_prompts = a.meta_prompts or a.batch
    return a


def _rows(*extra):
    return plan.plan(_args(*extra))


def test_llama2_7b_parameter_count_is_the_reward_models():
    s = plan.MODELS["llama-2-7b"]
    assert s.counted_params() == 6_607_347_712
    # The published 6.74e9 is the causal LM's count: an LM head (vocab x hidden) instead of the score head.
    assert s.counted_params() - s.hidden + s.vocab * s.hidden == 6_738_415_616


def _bytes_per_param(items_gb: dict, n: float) -> dict:
    return {k: v * GB / n for k, v in items_gb.items()}


def test_per_parameter_items_are_the_bytes_torch_and_bitsandbytes_keep():
    """The plan's standing memory per parameter against real tensors: the dtypes' sizes, and the state
    torch's AdamW and bitsandbytes' 8-bit AdamW hold after a step (a 2**16-element tensor, large enough
    for 8-bit state)."""
    import bitsandbytes as bnb

    p = _rows("--params", "6.74e9")
    row = {r["optimizer"]: r for r in p["rows"] if r["step"] == "metarm-copy" and not r["checkpointing"]}
    n = 6.74e9
    a, q = _bytes_per_param(row["adamw"]["memory_items_GB"], n), _bytes_per_param(row["adamw8bit"]["memory_items_GB"], n)
    size = {dt: torch.empty(0, dtype=dt).element_size() for dt in (torch.bfloat16, torch.float32)}
    assert a["bf16 compute weights"] == pytest.approx(size[torch.bfloat16])
    assert a["fp32 master weights"] == pytest.approx(size[torch.float32])
    assert a["bf16 gradients"] == pytest.approx(size[torch.bfloat16])
    assert a["copy-based backup (fp32)"] == pytest.approx(size[torch.float32])

    def state_bytes_per_param(make):
        w = torch.nn.Parameter(torch.randn(2**16))
        opt = make([w])
        w.grad = torch.randn(2**16)
        opt.step()
        return sum(t.numel() * t.element_size() for t in opt.state[w].values()
                   if isinstance(t, torch.Tensor) and t.numel() > 1 and t.data_ptr() not in _codebooks(opt)) / w.numel()

    assert a["optimizer states"] == pytest.approx(state_bytes_per_param(torch.optim.AdamW))
    measured_8bit = state_bytes_per_param(bnb.optim.AdamW8bit)
    assert q["optimizer states"] + q["8-bit absmax (fp32 per 256)"] == pytest.approx(measured_8bit)


def _codebooks(opt):
    """The 256-entry code books bitsandbytes shares among all tensors (not per-parameter memory)."""
    return {t.data_ptr() for st in opt.state.values() for k, t in st.items() if k.startswith("qmap")}


@pytest.mark.parametrize("cast", ["all", "per-tensor"])
def test_torch_adamw_with_copy_based_meta_step_never_fits_80gb(cast):
    rows = _rows("--master-grad-cast", cast)["rows"]
    sel = [r for r in rows if r["optimizer"] == "adamw" and r["step"] == "metarm-copy"]
    assert len(sel) == 8 and not any(r["fits"] for r in sel)
    assert all(r["memory_GB"] > 80 * 2**30 / GB for r in sel)


def test_recommended_combination_for_7b_on_80gb():
    p = _rows("--master-grad-cast", "per-tensor")
    rec = p["recommended"]
    assert rec is not None and rec["fits"] and rec["recommended"]
    assert rec["memory_GB"] * GB <= plan.usable_memory(p["gpu"], _args())
    # the conclusion docs/plan-7b.md draws
    assert (rec["step"], rec["optimizer"], rec["checkpointing"]) == ("metarm-inplace", "adamw8bit", True)


def test_less_memory_never_gives_a_faster_recommendation():
    """Fastest-that-fits: as the usable memory shrinks, the recommended step can only get slower,
    until nothing fits."""
    times = []
    for reserve in (0, 10, 20, 30, 40, 50, 60, 70):
        rec = _rows("--reserve-gb", str(reserve))["recommended"]
        times.append(rec["step_s"] if rec else float("inf"))
    assert times == sorted(times)
    assert times[0] < times[-2] and times[-1] == float("inf")  # the range covers a change and the end


def _by_combo(rows):
    return {(r["step"], r["optimizer"], r["checkpointing"], r["packing"], r["prompt_sharing"]): r for r in rows}


def test_memory_and_time_grow_with_the_batch_and_the_length():
    for flag, values in (("--batch", (4, 8, 16, 32)), ("--max-length", (256, 512, 1024, 2048))):
        plans = []
        for v in values:
            a = _args(flag, str(v))
            plans.append(_by_combo(plan.plan(a)["rows"]))
        for key in plans[0]:
            mem = [p[key]["memory_GB"] for p in plans]
            act = [p[key]["backward_peak_GB"] for p in plans]
            assert mem == sorted(mem) and act == sorted(act) and act[0] < act[-1], (flag, key)
            if flag == "--batch":
                t = [p[key]["step_s"] for p in plans]
                assert t == sorted(t) and t[0] < t[-1], key


def test_checkpointing_trades_time_for_memory_and_packing_saves_both():
    rows = _by_combo(_rows()["rows"])
    for (step, opt, ckpt, pack, share), r in rows.items():
        if ckpt:
            plain = rows[(step, opt, False, pack, share)]
            assert r["backward_peak_GB"] < plain["backward_peak_GB"] and r["step_s"] > plain["step_s"]
        if pack:
            padded = rows[(step, opt, ckpt, False, share)]
            assert r["backward_peak_GB"] <= padded["backward_peak_GB"] and r["step_s"] < padded["step_s"]
        if step == "metarm-copy":  # the copy-based meta step holds a whole fp32 copy more
            inplace = rows[("metarm-inplace", opt, ckpt, pack, share)]
            assert r["memory_GB"] > inplace["memory_GB"]


def test_casting_every_gradient_at_once_would_fit_nothing():
    # A trainer casting every bf16 gradient to fp32 before the step holds +4 B/param at once.
    p = _rows("--master-grad-cast", "all")
    assert p["recommended"] is None
    assert all(r["peak_phase"] == "optimizer step" for r in p["rows"] if r["optimizer"] == "adamw8bit" and r["checkpointing"])
    assert p["recommended_per_tensor_cast"]["fits"]


def test_flops_formula_for_a_padded_pass():
    s = plan.MODELS["llama-2-7b"]
    g = plan.pass_geometry(16, 2, 1024, pack=False, share=False, r_pack=0.39, r_share=0.25)
    f = plan.pass_flops(s, g, ckpt=False)
    n_mm = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 4096
    assert f["dense"] == 6 * n_mm * 32 * 1024
    assert f["attention"] == 12 * 32 * 4096 * 32 * 1024**2
    fc = plan.pass_flops(s, g, ckpt=True)
    assert fc["dense"] == 8 * n_mm * 32 * 1024 and fc["attention"] == 16 * 32 * 4096 * 32 * 1024**2


def test_shared_ratios_reproduce_the_readme_lengths():
    p, r = plan.split_ratios(0.39, 0.25)
    assert p == pytest.approx(0.28) and r == pytest.approx(0.11)  # 110 + 46 tokens of a 400-token padded sequence
    g = plan.pass_geometry(8, 2, 400, pack=True, share=True, r_pack=0.39, r_share=0.25)
    assert g.tokens == pytest.approx(0.25 * 8 * 2 * 400)
    with pytest.raises(ValueError):
        plan.split_ratios(0.39, 0.1)


def _saved_bytes(model, batch):
    """Bytes of the distinct storages autograd saves for backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        compute_rewards(model, batch)
    return sum(seen.values())


def _batch(lengths, vocab):
    b, t = len(lengths), max(lengths)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    mask = torch.zeros(b, t, dtype=torch.long)
    pos = torch.zeros(b, t, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        pos[i, :n] = torch.arange(n)
        ids[i, n:] = 0
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "last_index": torch.tensor(lengths) - 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [[7, 13, 5, 13], [11, 11, 11]], ids=["padded", "unpadded"])
def test_activation_formula_counts_exactly_what_torch_saves(dtype, lengths):
    torch.manual_seed(0)
    model = build_tiny_llama(50, 0, layers=3, hidden=96).to(dtype).train()  # 4 heads, 2 kv heads, head dim 24
    batch = _batch(lengths, 50)
    c = model.config
    shape = plan.Shape("t", c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                       c.intermediate_size, c.vocab_size)
    geo = plan.geometry_of(batch, rows_repeat_kv=True)
    predicted = plan.model_saved_bytes(shape, geo, 4 if dtype == torch.float32 else 2)["total"]
    assert _saved_bytes(model, batch) == predicted


def test_validate_predicts_the_measured_peak_on_a_small_model():
    rows = plan.validate(hidden=128, layers=2, checks=["fp32"], log=lambda *a: None)
    assert {r["step"] for r in rows} == {"vanilla", "metarm", "copy-based"}
    for r in rows:
        assert abs(r["error"]) <= 0.15, r
        assert r["standing_predicted_MiB"] == pytest.approx(r["standing_measured_MiB"], rel=1e-3)


def test_cli_writes_json_rows_and_takes_a_custom_shape(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert plan.main(["--model", "custom", "--hidden", "2048", "--layers", "16", "--heads", "16", "--kv-heads", "4",
                      "--intermediate", "5632", "--vocab", "32000", "--gpu", "h100-80g", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 48 and data["gpu"]["name"] == "H100-SXM-80GB"
    assert sum(r["recommended"] for r in data["rows"]) <= 1
    assert "Recommended for one" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        plan.main(["--model", "custom", "--hidden", "2048"])


def test_fsdp_plan_shards_the_standing_memory_and_recommends_a_fitting_setting():
    a = _args("--gpus", "8")
    p = plan.plan(a)
    fp = plan.fsdp_plan(a, p["shape"], p["gpu"])
    n = p["shape"].params()
    for r in fp["rows"]:
        items = r["memory_items_GB"]
        # (4 + 4 + 8) B/param over 8 GPUs, and the meta step's one local gradient shard
        assert items["fp32 sharded weights (masters)"] + items["fp32 sharded gradients"] + items[
            "AdamW states (fp32, sharded)"] == pytest.approx(16 * n / 8 / plan.GB)
        assert items["meta step: z, one local gradient shard"] == pytest.approx(4 * n / 8 / plan.GB)
        assert r["step_s"] <= r["step_s_no_overlap"]
    rec = fp["recommended"]
    assert rec is not None and rec["fits"]
    assert rec["memory_GB"] < p["recommended"]["memory_GB"]  # sharded: less per GPU than one GPU's plan
