"""Test-session set-up for the whole repository: the order in which the two pytest workers get files.

`make test` runs with `--dist loadfile --no-loadscope-reorder`: each file goes to one worker, in the
order of this list. The notebooks that take longest under nbval (measured with `--durations`) go first,
so that neither worker is left alone with one of them at the end; everything else keeps pytest's
collection order (the sort is stable).
"""

LONGEST_FIRST = (
    "ch05_evaluation/04_chat.ipynb",          # about 10 minutes: three fine-tuning seeds
    "ch03_model/04_pretraining.ipynb",        # about 5 minutes: the CPU preset is trained
    "ch05_evaluation/01_perplexity.ipynb",
    "ch02_data/05_vocabulary_scaling.ipynb",
    "ch03_model/06_inside_the_model.ipynb",
    "ch05_evaluation/02_mmlu.ipynb",
    "ch04_distributed/07_communication_and_failures.ipynb",
)


def pytest_collection_modifyitems(items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
