"""The README's code snippet runs as written, and its commands are the CI's."""

import re


def _readme(repo_root):
    return (repo_root / 'README.md').read_text(encoding='utf-8')


def _run_snippet(repo_root, heading):
    """Runs the first python block after `heading`; returns its namespace."""
    section = _readme(repo_root).split(heading, 1)[1]
    code = re.search(r'```python\n(.*?)```', section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
    return namespace


def test_readme_snippet_runs(repo_root):
    namespace = _run_snippet(
        repo_root, '## Use `dlcft_jax.step` in your own code'
    )
    state = namespace['state']
    assert int(state.task) == 2
    assert namespace['logits'].shape == (4, 4)


def test_readme_composition_snippet_runs(repo_root):
    namespace = _run_snippet(repo_root, '### Compose your own method')
    state = namespace['state']
    assert int(state.task) == 2
    assert type(state.curvature).__name__ == 'DiagonalCurvature'
    assert float(namespace['metrics']['penalty']) > 0


def test_readme_test_command_is_what_ci_runs(repo_root):
    text = _readme(repo_root)
    commands = re.search(r'```bash\n(.*?)```', text, re.S).group(1)
    lines = [
        line
        for line in commands.splitlines()
        if line and not line.startswith('#')
    ]
    assert len(lines) == 2, lines
    assert 'experiments.run' in lines[0]
    test_cmd = lines[1].split('&&')[-1].strip()
    assert test_cmd == 'python -m pytest -q'
    ci = (repo_root / '.ci' / 'run').read_text(encoding='utf-8')
    assert test_cmd in ci
