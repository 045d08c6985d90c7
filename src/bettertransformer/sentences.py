"""Real sentences for the demo, tests and benchmarks: a small batch of very different lengths (``sentences``), and
a corpus of real English prose (``corpus``)."""

import functools
import re

SHORT = [
    "Hello there.",
    "The cat sat down.",
    "Rain again today.",
    "Is the shop open?",
    "Thanks a lot!",
    "We lost the keys.",
    "Coffee first, then email.",
    "The train was late.",
    "Call me tomorrow.",
    "That was a good film.",
    "Where is the station?",
    "I like green tea.",
]

MEDIUM = [
    "The committee postponed its decision until the budget figures for the next quarter are available.",
    "She planted tomatoes along the south wall, where the afternoon sun keeps the soil warm.",
    "After the update, the application starts faster but uses a little more memory on older phones.",
    "Most of the volunteers arrived early, so the clean-up of the river bank finished before noon.",
    "A good night's sleep does more for a hard exam than another hour of reading the same notes.",
    "The museum's new wing shows tools, maps and letters from the harbour's busiest years.",
]

LONG = [
    "When the old bridge closed for repairs, the town council expected a few weeks of inconvenience, but the "
    "engineers found corrosion deep inside the steel supports, and the work stretched through the whole winter. "
    "Shops near the river lost customers, buses took a long detour through the hills, and children crossed on a "
    "small ferry that the fishermen ran twice an hour. By spring the bridge reopened, painted a bright blue, and "
    "the ferry kept running on weekends because people had grown fond of it.",
    "Modern weather forecasts combine measurements from satellites, balloons, ships and thousands of ground "
    "stations into a single picture of the atmosphere, then step a physical model forward in time on large "
    "computers. Small errors in the starting picture grow as the model runs, which is why forecasters run the "
    "same model many times from slightly different starting points and report how much the results agree. A "
    "forecast for five days ahead today is about as reliable as a forecast for one day ahead was fifty years ago.",
]


def sentences(n: int = 64) -> list[str]:
    """``n`` sentences, mostly short as real traffic tends to be: every 16th long (from the first), every 4th
    of the rest medium, the others short. Any batch of 8 or more holds all three kinds."""
    out = []
    for i in range(n):
        if i % 16 == 0:
            out.append(LONG[(i // 16) % len(LONG)])
        elif i % 4 == 0:
            out.append(MEDIUM[(i // 4) % len(MEDIUM)])
        else:
            out.append(SHORT[i % len(SHORT)])
    return out


@functools.cache
def _prose() -> tuple[str, ...]:
    from pydoc_data.topics import topics  # the prose of Python's own documentation, shipped with Python

    parts = (part.strip() for part in re.split(r"(?<=[.!?])\s+", "\n".join(topics.values())))
    return tuple(part for part in parts if len(part) > 20)


def corpus(n: int) -> list[str]:
    """The first ``n`` sentences of the prose of Python's ``pydoc_data.topics`` (split at sentence ends, those over
    20 characters kept; about 3,100 of them, ~147 characters on average), repeated when ``n`` asks for more: the
    end-to-end encode workload of DESIGN.md."""
    prose = _prose()
    return [prose[i % len(prose)] for i in range(n)]
