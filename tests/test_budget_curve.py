"""benchmarks/budget_curve.py collects the study's runs per budget."""

import json

from benchmarks import budget_curve


def _write(path, acc, gaps, wall):
    path.mkdir(parents=True)
    per = [{'objective_gap': g, 'objective': 1.0 + g} for g in gaps]
    res = {
        'complete': True,
        'average_accuracy': acc,
        'per_task': per,
        'wall_time_s': wall,
    }
    (path / 'results.json').write_text(json.dumps(res))


def test_points_tables_and_plot(tmp_path):
    root = tmp_path / 'study'
    _write(budget_curve.folder(root, 'g', 313, 'dlcft', 0), 40.0, [1, 2], 60)
    _write(budget_curve.folder(root, 'g', 1000, 'dlcft', 0), 45.0, [0.5], 180)
    curves, missing = budget_curve.collect(
        root, 'g', ['dlcft', 'other'], [313, 1000, 3000], 0
    )
    assert [p['objective_gap_sum'] for p in curves['dlcft']] == [3.0, 0.5]
    assert missing == [
        'dlcft at 3000 steps',
        'other at 313 steps',
        'other at 1000 steps',
        'other at 3000 steps',
    ]
    text = budget_curve.table(curves, missing)
    assert '| `dlcft` | 1000 | 45.00 % | 0.500 | 1.500 | 3.0 min |' in text
    budget_curve.plot(curves, tmp_path / 'curve.png')
    assert (tmp_path / 'curve.png').stat().st_size > 0
