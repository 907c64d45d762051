"""A real PostgreSQL gradebook, as `lorakit grade --db` promises: two machines grade two shards of one class
at the same moment into one server.

The test starts its own throwaway PostgreSQL server (Debian's `postgresql` package, installed by
tests/install_postgresql.sh; initdb and pg_ctl run as an unprivileged user in a temporary folder, listening
on a Unix socket only), then runs `lorakit grade LESSON --shard 1/2` and `--shard 2/2` as two processes at
once against it: both register the lesson, both create students and write grades concurrently. Afterwards
every submission of the class must be there exactly once, with exactly one grade per test cell, and the
scores the submissions earned. Without the server binaries or a driver the test skips and says why.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lorakit.grading import gradebook

import adversarial  # tests/adversarial.py: the kit's own attack table

pytestmark = [pytest.mark.slow, pytest.mark.installed_by("install_postgresql")]

LESSON = "00_setup"
# student -> (exercises solved, the score that earns: weights_gb needs bytes_per_param to be defined)
CLASS = {f"student{i:02d}": kind for i, kind in enumerate([("all", 2), (set(), 0), ({"ex00_bytes_per_param"}, 1),
                                                           ("all", 2), ("all", 2), ({"ex00_weights_gb"}, 0),
                                                           (set(), 0), ("all", 2)])}


def _binary(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@pytest.fixture(scope="module")
def postgres():
    """A running PostgreSQL server in a temporary folder: yields its SQLAlchemy URL."""
    import psycopg2  # noqa: F401  (the [dev] extra's driver: required, not optional)
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("the PostgreSQL server binaries (initdb, pg_ctl) are not installed: "
                    "bash tests/install_postgresql.sh installs Debian's postgresql")
    run_as = {}
    root = Path(tempfile.mkdtemp(prefix="lorakit-pg-"))
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            user = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root and there is no unprivileged 'nobody' user to run PostgreSQL as")
        run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        os.chown(root, user.pw_uid, user.pw_gid)
    data, sock = root / "data", root / "sock"
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": str(root)}

    def run(*cmd):
        res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=root, timeout=120, **run_as)
        assert res.returncode == 0, f"{cmd[0]} failed:\n{res.stdout}\n{res.stderr}"
        return res

    sock_ok = subprocess.run(["mkdir", "-m", "0755", str(sock)], **run_as).returncode == 0
    assert sock_ok
    run(initdb, "-D", data, "-U", "lorakit", "--auth=trust", "--no-sync", "-E", "UTF8")
    port = 54000 + os.getpid() % 1000
    run(pg_ctl, "-D", data, "-w", "-t", "60", "-l", root / "server.log", "-o",
        f"-k {sock} -c listen_addresses='' -p {port} -c fsync=off", "start")
    try:
        import psycopg2
        con = psycopg2.connect(host=str(sock), port=port, user="lorakit", dbname="postgres")
        con.autocommit = True
        con.cursor().execute("CREATE DATABASE gradebook")
        con.close()
        yield f"postgresql+psycopg2://lorakit@/gradebook?host={sock}&port={port}"
    finally:
        subprocess.run([pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, env=env, cwd=root, **run_as)
        shutil.rmtree(root, ignore_errors=True)


def test_two_shards_graded_at_once_into_one_postgres_gradebook(postgres, tmp_path):
    subs = {name: (adversarial.student_notebook(LESSON, solved=kind, minimal=True), None) for name, (kind, _) in CLASS.items()}
    adversarial.write(subs, tmp_path / "class")
    cli = "import sys; from lorakit.cli import main; sys.exit(main(sys.argv[1:]))"
    procs = [subprocess.Popen([sys.executable, "-c", cli, "grade", LESSON, str(tmp_path / "class"), "--db", postgres,
                               "--shard", f"{i}/2", "--workers", "1", "--out", str(tmp_path / f"out{i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (1, 2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    graded = [set(l.split()[0] for l in log.splitlines() if l.startswith("  student")) for log in logs]
    assert graded[0] and graded[1] and not graded[0] & graded[1], logs   # two real shards, no overlap
    assert graded[0] | graded[1] == set(CLASS)

    import sqlalchemy as sa
    engine = sa.create_engine(postgres)
    with engine.connect() as con:
        subs_per_student = dict(con.execute(sa.text(
            "SELECT st.id, count(*) FROM submitted_assignment sa JOIN student st ON sa.student_id = st.id "
            "JOIN assignment a ON sa.assignment_id = a.id WHERE a.name = :lesson GROUP BY st.id"), {"lesson": LESSON}).all())
        grades = con.execute(sa.text(
            "SELECT st.id, gc.name, count(*), max(g.auto_score) FROM grade g "
            "JOIN submitted_notebook sn ON g.notebook_id = sn.id JOIN submitted_assignment sa ON sn.assignment_id = sa.id "
            "JOIN student st ON sa.student_id = st.id JOIN base_cell gc ON g.cell_id = gc.id "
            "GROUP BY st.id, gc.name")).all()
        n_assignments = con.execute(sa.text("SELECT count(*) FROM assignment WHERE name = :lesson"), {"lesson": LESSON}).scalar()
    engine.dispose()
    assert n_assignments == 1, "the lesson was registered twice"
    assert subs_per_student == {name: 1 for name in CLASS}, subs_per_student
    cells = {"ex00_bytes_per_param_test", "ex00_weights_gb_test"}
    assert {(s, c) for s, c, _, _ in grades} == {(s, c) for s in CLASS for c in cells}
    assert all(n == 1 for _, _, n, _ in grades), [g for g in grades if g[2] != 1]
    scores = gradebook.read_gradebook(postgres, LESSON)
    assert scores == {name: earned for name, (_, earned) in CLASS.items()}, scores
