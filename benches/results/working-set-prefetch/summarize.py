# Summarises mcdist-kvm-demo --generations 2 outputs: python3 summarize.py DIR
import re,glob,statistics as S,sys
d=sys.argv[1]
for pat in ['s4096','s256','s64','r10g']:
    rows={}
    n=0
    for f in sorted(glob.glob(d+'/'+pat+'-*.txt')):
        n+=1
        for l in open(f):
            m=re.match(r'^ *(off|push|push\+prefetch|push\+prefetch 1st) +([12]) +(\d+) +(\d+) +(\d+) +([\d.]+)',l)
            if m:
                rows.setdefault((m[1],m[2]),[]).append((int(m[3]),float(m[6]),int(m[5])))
    print(pat, n, 'runs')
    for mode in ['off','push','push+prefetch','push+prefetch 1st']:
        if (mode,'1') not in rows: continue
        g1=rows[(mode,'1')]; g2=rows[(mode,'2')]
        ratios=[a[0]/b[0] if b[0] else float('inf') for a,b in zip(g1,g2)]
        print(f"  {mode:18} g1 faults med {S.median([a[0] for a in g1]):.0f} g2 {[b[0] for b in g2]} ratio med {S.median(ratios):.1f} [{min(ratios):.1f}..{max(ratios):.1f}] wall g1 med {S.median([a[1] for a in g1]):.0f} g2 med {S.median([b[1] for b in g2]):.0f} [{min(b[1] for b in g2):.0f}..{max(b[1] for b in g2):.0f}]")
