import os
import signal
import subprocess
import sys
import textwrap
import time

from lingua.sample_store import SampleStore, make_key


def test_key_is_stable_and_order_independent():
    assert make_key(a=1, b="x") == make_key(b="x", a=1)
    assert make_key(a=1, b="x") != make_key(a=1, b="y")


def test_put_get_topup_and_first_write_wins(tmp_path):
    with SampleStore(tmp_path / "s.db") as st:
        k = make_key(prompt="p")
        assert st.put_many([(k, 0, {"v": 0}), (k, 1, {"v": 1})]) == 2
        assert [s["v"] for s in st.get(k)] == [0, 1]
        # top up to 4; re-writing idx 1 does not replace it
        st.put_many([(k, 1, {"v": 99}), (k, 2, {"v": 2}), (k, 3, {"v": 3})])
        assert [s["v"] for s in st.get(k)] == [0, 1, 2, 3]
        assert st.count() == 4
    # survives reopen
    with SampleStore(tmp_path / "s.db") as st:
        assert len(st.get(k)) == 4


def test_hole_is_not_skipped(tmp_path):
    with SampleStore(tmp_path / "s.db") as st:
        k = make_key(x=1)
        st.put_many([(k, 0, {"v": 0}), (k, 2, {"v": 2})])
        assert [s["v"] for s in st.get(k)] == [0]  # idx 1 missing -> caller redraws 1.. and 2 is kept


def test_kill_during_writes_loses_nothing_committed(tmp_path):
    db = tmp_path / "s.db"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {os.getcwd()!r})
        from lingua.sample_store import SampleStore, make_key
        st = SampleStore({str(db)!r})
        i = 0
        while True:
            st.put_many([(make_key(i=i), j, {{"i": i, "j": j}}) for j in range(4)])
            print(i, flush=True)
            i += 1
        """
    )
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    seen = 0
    t0 = time.time()
    while seen < 50 and time.time() - t0 < 30:
        line = p.stdout.readline()
        if line:
            seen = int(line) + 1
    p.send_signal(signal.SIGKILL)
    p.wait()
    with SampleStore(db) as st:
        n = st.count()
        assert n % 4 == 0 and n >= 4 * seen  # whole batches only
        groups = st.get_many([make_key(i=i) for i in range(n // 4)])
        assert all(len(v) == 4 for v in groups.values()) and len(groups) == n // 4
