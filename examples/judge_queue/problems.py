"""The problems the judges know, the four verdicts, and the sample programs the load
generator submits.

A problem is one input (every test case, one per line) and the output a correct
program prints for it; outputs are compared token by token, as online judges do, so
trailing spaces and the final newline do not matter. Each sample program is written
to earn one verdict, which is how the example knows the right verdict for every
submission without asking the judges.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum


class Verdict(StrEnum):
    ACCEPTED = "accepted"
    WRONG_ANSWER = "wrong answer"
    TIME_LIMIT_EXCEEDED = "time limit exceeded"
    RUNTIME_ERROR = "runtime error"


@dataclass(frozen=True)
class Problem:
    input: str
    expected: str


PROBLEMS = {
    "sum": Problem(input="3 4\n10 -2\n100 23\n", expected="7\n8\n123\n"),
    "reverse": Problem(input="polybus\nqueue\nlevel\n", expected="subylop\neueuq\nlevel\n"),
    "max": Problem(input="3 9 2\n-1 -7\n5\n", expected="9\n-1\n5\n"),
}

#: per problem, a program that earns each verdict
SAMPLES: dict[str, dict[Verdict, str]] = {
    "sum": {
        Verdict.ACCEPTED: (
            "import sys\nfor line in sys.stdin:\n    a, b = map(int, line.split())\n"
            "    print(a + b)\n"
        ),
        Verdict.WRONG_ANSWER: (
            "import sys\nfor line in sys.stdin:\n    a, b = map(int, line.split())\n"
            "    print(a * b)\n"
        ),
        Verdict.RUNTIME_ERROR: "import sys\nfor line in sys.stdin:\n    print(int(line) + 1)\n",
        Verdict.TIME_LIMIT_EXCEEDED: "total = 0\nwhile True:\n    total += 1\n",
    },
    "reverse": {
        Verdict.ACCEPTED: "import sys\nfor line in sys.stdin:\n    print(line.rstrip()[::-1])\n",
        Verdict.WRONG_ANSWER: "import sys\nfor line in sys.stdin:\n    print(line.rstrip())\n",
        Verdict.RUNTIME_ERROR: "import sys\nwords = sys.stdin.read().split()\nprint(words[3])\n",
        Verdict.TIME_LIMIT_EXCEEDED: (
            "import sys\ntext = sys.stdin.read()\nwhile text:\n    text = text[::-1]\n"
        ),
    },
    "max": {
        Verdict.ACCEPTED: (
            "import sys\nfor line in sys.stdin:\n    print(max(map(int, line.split())))\n"
        ),
        Verdict.WRONG_ANSWER: (
            "import sys\nfor line in sys.stdin:\n    print(min(map(int, line.split())))\n"
        ),
        Verdict.RUNTIME_ERROR: (
            "import sys\nnumbers = [int(x) for x in sys.stdin.read().split()]\n"
            "print(numbers[0] // (numbers[0] - 3))\n"
        ),
        Verdict.TIME_LIMIT_EXCEEDED: "n = 1\nwhile n > 0:\n    n += 1\n",
    },
}

#: out of every 10 submissions: how many earn each verdict
MIX = {
    Verdict.ACCEPTED: 5,
    Verdict.WRONG_ANSWER: 2,
    Verdict.RUNTIME_ERROR: 2,
    Verdict.TIME_LIMIT_EXCEEDED: 1,
}


@dataclass(frozen=True)
class Sample:
    problem: str
    source: str
    expected: Verdict


def workload(count: int, seed: int) -> list[Sample]:
    """``count`` submissions in ``MIX``'s proportions, problems in turn, in a shuffled order."""
    verdicts = [verdict for verdict, share in MIX.items() for _ in range(share)]
    names = list(PROBLEMS)
    samples = [
        Sample(
            problem := names[n % len(names)],
            SAMPLES[problem][expected := verdicts[n % len(verdicts)]],
            expected,
        )
        for n in range(count)
    ]
    random.Random(seed).shuffle(samples)
    return samples
