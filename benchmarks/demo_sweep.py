"""Demo tuning harness (as run for benchmarks/results/demo-sweep.md): train configs/toy-kto.yaml on one fixed,
already judged feedback set with overrides, then score base and aligned on the held-out prompts (GROUPS seed groups:
4 = 36 median-of-5 comparisons; 8 = the demo's 72, whose seed-0 evaluation images these are) and append one JSON line (also: liked share at the demo's 0.85, shape and sharpness means) to <out>/results.jsonl.

    python benchmarks/demo_sweep.py NAME FEEDBACK.jsonl GROUPS [key=value ...]   (env DEMO_SWEEP_OUT, default runs/demo-sweep;
    env DEMO_SWEEP_SEED, default 0: the demo --seed the feedback was collected with, for train.seed and the evaluation seeds)
"""
import sys, json, time, pickle, os
from pathlib import Path
import numpy as np
from diffusion_kto.config import load_config
from diffusion_kto.train import DiffusionKTOTrainer
from diffusion_kto.sampling import load_pipeline
from diffusion_kto.toy import judges
from diffusion_kto.apps.demo import CONFIG, DemoSettings, eval_images, diversity
from diffusion_kto.evaluation import winrate

name = sys.argv[1]; feedback = sys.argv[2]; groups = int(sys.argv[3]); overrides = sys.argv[4:]
root = Path(os.environ.get('DEMO_SWEEP_OUT', 'runs/demo-sweep'))
out = root / 'runs' / name
seed = int(os.environ.get('DEMO_SWEEP_SEED', '0'))  # the demo's --seed: evaluation seeds and train.seed (feedback: the file given)
demo = DemoSettings(groups_per_prompt=groups, seed=seed)
def ev(pipe):
    ims, ps, _ = eval_images(pipe, demo)
    s = np.asarray(judges.preference(ims, ps)).reshape(-1, 5)
    return dict(scores=s, fid=float(np.mean(judges.fidelity(ims, ps))), div=diversity(ims, 5),
                clean=float(np.mean(judges.clean_score(ims, ps))), liked=float((s>=0.5).mean()),
                liked085=float((s>=0.85).mean()), shape=float(np.mean(judges.shape_score(ims, ps))),
                sharp=float(np.mean(judges.sharpness_score(ims, ps))))
bcache = root / (f'base_g{groups}.pkl' if seed == 0 else f'base_g{groups}_s{seed}.pkl')
root.mkdir(parents=True, exist_ok=True)
if not bcache.exists():
    pickle.dump(ev(load_pipeline('toy', device='cpu')), open(bcache,'wb'))
base = pickle.load(open(bcache,'rb'))
t=time.perf_counter()
cfg = load_config(CONFIG, [f"data.path={feedback}", f"train.output_dir={out}", "train.overwrite=true", "log.every=50", f"train.seed={seed}", *overrides])
res = DiffusionKTOTrainer(cfg).train()
tt=time.perf_counter()-t
lora = (out / 'pytorch_lora_weights.safetensors').is_file()  # lora.rank > 0 runs export adapters, full runs a UNet
al = ev(load_pipeline('toy', device='cpu', **({'lora': str(out)} if lora else {'unet': str(out)})))
wr = winrate.win_rate(al['scores'], base['scores'])
line = dict(name=name, overrides=overrides, train_s=round(tt), wr=round(wr.rate,3), ci=round(wr.ci,3), n=wr.n,
            mean=(round(float(base['scores'].mean()),3), round(float(al['scores'].mean()),3)),
            liked=(round(base['liked'],3), round(al['liked'],3)), fid=(round(base['fid'],3), round(al['fid'],3)),
            div_ratio=round(al['div']/base['div'],3), clean=(round(base['clean'],3), round(al['clean'],3)),
            **{k: (round(base[k],3), round(al[k],3)) for k in ('liked085', 'shape', 'sharp')})
print(json.dumps(line)); open(root / 'results.jsonl', 'a').write(json.dumps(line)+'\n')
