"""Test-session set-up for the whole repository: which items run, and in which order the two pytest
workers get their files.

`make test` runs with `--dist loadfile --no-loadscope-reorder`: each file goes to one worker, in the
order of this list. The notebooks that take longest under nbval (measured with `--durations`) go first,
so that neither worker is left alone with one of them at the end; everything else keeps pytest's
collection order (the sort is stable).

When the JupyterLab test (tests/test_jupyterlab.py) runs rather than skips, it executes the first
notebook of each chapter in the browser and compares the outputs with the committed ones as nbval
does; nbval's own items for those notebooks are then deselected, so that no notebook runs twice.
"""

LONGEST_FIRST = (
    "ch05_evaluation/04_chat.ipynb",          # about 10 minutes: three fine-tuning seeds
    "tests/test_jupyterlab.py",               # about 4 minutes: five notebooks run in JupyterLab
    "ch03_model/04_pretraining.ipynb",        # about 3 minutes: the CPU preset is trained
    "ch05_evaluation/01_perplexity.ipynb",
    "ch02_data/05_vocabulary_scaling.ipynb",
    "ch03_model/06_inside_the_model.ipynb",
    "ch05_evaluation/02_mmlu.ipynb",
    "ch04_distributed/07_communication_and_failures.ipynb",
)


def pytest_collection_modifyitems(config, items):
    browser = [item for item in items if item.nodeid.startswith("tests/test_jupyterlab.py::")]
    skipped = any(marker.args[0] for item in browser[:1] for marker in item.iter_markers("skipif"))
    if browser and not skipped:
        in_browser = {item.callspec.params["name"] for item in browser}
        twice = [item for item in items if item.nodeid.split("::")[0] in in_browser]
        if twice:
            config.hook.pytest_deselected(items=twice)
            items[:] = [item for item in items if item.nodeid.split("::")[0] not in in_browser]
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
