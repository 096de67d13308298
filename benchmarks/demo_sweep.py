"""Demo tuning harness (as run for benchmarks/results/demo-sweep.md): train configs/toy-kto.yaml on one fixed,
already judged feedback set with overrides, then score base and aligned on the held-out prompts (4 seed groups,
36 median-of-5 comparisons) and append one JSON line to <out>/results.jsonl.

    python benchmarks/demo_sweep.py NAME FEEDBACK.jsonl GROUPS [key=value ...]   (env DEMO_SWEEP_OUT, default runs/demo-sweep)
"""
import sys, json, time, pickle, os
from pathlib import Path
import numpy as np
from diffusion_kto.config import load_config
from diffusion_kto.train import DiffusionKTOTrainer
from diffusion_kto.sampling import load_pipeline
from diffusion_kto.toy import judges
from diffusion_kto.toy.demo import CONFIG, DemoSettings, eval_images, diversity
from diffusion_kto.evaluation import winrate

name = sys.argv[1]; feedback = sys.argv[2]; groups = int(sys.argv[3]); overrides = sys.argv[4:]
root = Path(os.environ.get('DEMO_SWEEP_OUT', 'runs/demo-sweep'))
out = root / 'runs' / name
demo = DemoSettings(groups_per_prompt=groups)
def ev(pipe):
    ims, ps, _ = eval_images(pipe, demo)
    s = np.asarray(judges.preference(ims, ps)).reshape(-1, 5)
    return dict(scores=s, fid=float(np.mean(judges.fidelity(ims, ps))), div=diversity(ims, 5),
                clean=float(np.mean(judges.clean_score(ims, ps))), liked=float((s>=0.5).mean()))
bcache = root / f'base_g{groups}.pkl'
root.mkdir(parents=True, exist_ok=True)
if not bcache.exists():
    pickle.dump(ev(load_pipeline('toy', device='cpu')), open(bcache,'wb'))
base = pickle.load(open(bcache,'rb'))
t=time.perf_counter()
cfg = load_config(CONFIG, [f"data.path={feedback}", f"train.output_dir={out}", "train.overwrite=true", "log.every=50", *overrides])
res = DiffusionKTOTrainer(cfg).train()
tt=time.perf_counter()-t
al = ev(load_pipeline('toy', device='cpu', unet=str(out)))
wr = winrate.win_rate(al['scores'], base['scores'])
line = dict(name=name, overrides=overrides, train_s=round(tt), wr=round(wr.rate,3), ci=round(wr.ci,3), n=wr.n,
            mean=(round(float(base['scores'].mean()),3), round(float(al['scores'].mean()),3)),
            liked=(round(base['liked'],3), round(al['liked'],3)), fid=(round(base['fid'],3), round(al['fid'],3)),
            div_ratio=round(al['div']/base['div'],3), clean=(round(base['clean'],3), round(al['clean'],3)))
print(json.dumps(line)); open(root / 'results.jsonl', 'a').write(json.dumps(line)+'\n')
