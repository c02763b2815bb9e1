# Summarises mcdist-kvm-demo --generations 2 outputs in DIR (files s<stride>-<run>.txt and
# r10g-<run>.txt): per mode, generation 1 / generation 2 demand faults and generation 2's
# wall time.  python3 summarize.py DIR
import glob
import re
import statistics as S
import sys

d = sys.argv[1]
row = re.compile(r'^ *(\S+(?: \S+)?) +([12]) +(\d+) +(\d+) +(\d+) +([\d.]+) +\S+')
for pat in ['s4096', 's256', 's64', 'r10g']:
    rows, order = {}, []
    files = sorted(glob.glob(f'{d}/{pat}-*.txt'))
    for f in files:
        for line in open(f):
            m = row.match(line)
            if m and not line.lstrip().startswith(('id', 'working')):
                if m[1] not in order:
                    order.append(m[1])
                rows.setdefault((m[1], m[2]), []).append((int(m[3]), float(m[6])))
    print(pat, len(files), 'runs')
    for mode in order:
        g1, g2 = rows[(mode, '1')], rows[(mode, '2')]
        ratios = [a[0] / b[0] if b[0] else float('inf') for a, b in zip(g1, g2)]
        walls = [b[1] for b in g2]
        print(f"  {mode:18} gen 1 faults median {S.median(a[0] for a in g1):.0f}, gen 2 {[b[0] for b in g2]}, "
              f"ratio median {S.median(ratios):.1f} [{min(ratios):.1f}..{max(ratios):.1f}], "
              f"gen 1 wall median {S.median(a[1] for a in g1):.0f} ms, gen 2 {S.median(walls):.0f} ms "
              f"[{min(walls):.0f}..{max(walls):.0f}]")
