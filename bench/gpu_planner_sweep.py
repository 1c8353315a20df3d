"""Planner estimate vs measured CUDA peak over micro-batch sizes (phi-2 shape, T4 recipe, fp16).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 bench/gpu_planner_sweep.py     (carry gpu_inputs)
"""
import sys, time, types, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench.gpu_check as g
g.OPTS = types.SimpleNamespace(cpu_dry_run=False, t4_cap_gib=16.0)
from clara.recipes.loop import make_optimizer
from clara.recipes.planner import estimate_peak_memory

GiB = 1024**3
dev = torch.device("cuda")
cfg, precision, common = g.planner_setup(dev)
tok = g.ROOT / "gpu_inputs" / "base"
for ckpt in (True, False):
    model = g.build_clara_random(cfg, tok, dev, precision.weight_dtype, 16, ckpt)
    opt = make_optimizer(model, g.OPT_ARGS)
    scaler = torch.amp.GradScaler("cuda")
    for b in ((2, 8, 16, 32, 45) if ckpt else (2, 8, 16)):
        g.free_cuda()
        base = torch.cuda.memory_allocated()
        batch = model.collate(g.stage1_examples(b), max_len=2048)
        t = time.time()
        g.recipe_step(model, batch, opt, scaler, precision, dev)
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        g.recipe_step(model, batch, opt, scaler, precision, dev)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        ml = batch.decoder.input_ids.shape[1]
        est = estimate_peak_memory(cfg, micro_batch=b, max_len=ml, gradient_checkpointing=ckpt, **common)
        est_a = estimate_peak_memory(cfg, micro_batch=b, max_len=ml, gradient_checkpointing=ckpt,
                                     logits_tokens=batch.n_target_tokens, **common)
        print(f"ckpt={ckpt} b={b:3d} max_len={ml} peak={peak/GiB:.2f} GiB (static before step {base/GiB:.2f}) "
              f"reserved={torch.cuda.max_memory_reserved()/GiB:.2f} est_default={est.total/GiB:.2f} "
              f"est_answer_logits={est_a.total/GiB:.2f} phase={est_a.peak_phase} rel={(est_a.total-peak)/peak:+.3f} "
              f"step {time.time()-t:.1f}s", flush=True)
        print("   parts:", {k: round(getattr(est_a, k)/GiB, 3) for k in ("frozen_weights", "encoder_activations",
              "decoder_activations", "recompute", "logits", "backward_working")}, flush=True)
        batch = None
        opt.zero_grad(set_to_none=True)
    model = opt = None
    g.free_cuda()
