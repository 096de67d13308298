"""Where the demo's aligned model loses to the base (README "What the demo produced"): regenerate the demo's deterministic evaluation images from the base and runs/demo/model, and split the median-of-5 comparisons by whether each median is liked (score >= 0.85).  Run: OMP_NUM_THREADS=1 python benchmarks/demo_losses.py"""
import numpy as np
from diffusion_kto.sampling import load_pipeline
from diffusion_kto.toy import judges
from diffusion_kto.apps.demo import DemoSettings, eval_images
from diffusion_kto.evaluation import winrate
d=DemoSettings()
S={}
for n,kw in (("base",{}),("al",{"unet":"runs/demo/model"})):
    ims,ps,_=eval_images(load_pipeline("toy",device="cpu",**kw), d)
    S[n]=np.asarray(judges.preference(ims,ps)).reshape(-1,5)
mb=np.sort(S["base"],1)[:,2]; ma=np.sort(S["al"],1)[:,2]
print("win rate", winrate.win_rate(S["al"],S["base"]).rate)
lose=ma<mb; tie=ma==mb
th=0.85
print("n",len(mb),"losses",lose.sum(),"ties",tie.sum())
print("losses where both medians liked", (lose&(mb>=th)&(ma>=th)).sum(), " base liked & aligned not", (lose&(mb>=th)&(ma<th)).sum(), " both disliked", (lose&(mb<th)&(ma<th)).sum())
print("wins where both liked", ((ma>mb)&(mb>=th)&(ma>=th)).sum(), " aligned liked, base not", ((ma>mb)&(ma>=th)&(mb<th)).sum(), " both disliked", ((ma>mb)&(mb<th)&(ma<th)).sum())
