"""Process-level allocator tuning (boltzformer.runtime)."""

import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator tuning is Linux-only")
def test_the_tuned_heap_covers_the_network_and_is_given_back_after():
    """The heap kept every freed block after the network too: 300-1000 MB of a 300 x 512² CT's
    2.0 GB peak were post-processing's freed arrays. Run in a child: the tuning is process-wide."""
    script = (
        "import numpy as np\n"
        "from boltzformer import runtime\n"
        "def rss():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')) / 1024\n"
        "runtime.tune_allocator()\n"
        "base = rss()\n"
        "with runtime.network_heap():\n"
        "    a = np.ones(300 * 2**20 // 8); del a\n"
        "    held = rss() - base\n"
        "print(held, rss() - base)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    held, after = (float(v) for v in out.stdout.split())
    assert held > 250 and after < 50, out.stdout  # kept while the network runs, returned after
