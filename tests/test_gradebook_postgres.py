"""A real PostgreSQL gradebook, as `lorakit grade --db` promises: two machines grade two shards of one class
at the same moment into one server.

The test starts its own throwaway PostgreSQL server (Debian's `postgresql` package, installed by
tests/install_postgresql.sh; initdb and pg_ctl run as an unprivileged user in a temporary folder, listening
on a Unix socket only), then runs `lorakit grade LESSON --shard 1/2` and `--shard 2/2` as two processes at
once against it: both register the lesson, both create students and write grades concurrently. Afterwards
every submission of the class must be there exactly once, with exactly one grade per test cell, and the
scores the submissions earned. The cluster job files `lorakit shards` writes (a Slurm array script, a
Kubernetes Indexed Job) are rendered for 4 shards and their 4 tasks run here as local processes, the way each
engine would start them (SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX), each into a fresh database of the same
server, with the same checks. Without the server binaries or a driver the tests skip and say why.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
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


CLI = "import sys; from lorakit.cli import main; sys.exit(main(sys.argv[1:]))"


def _write_class(folder: Path) -> Path:
    subs = {name: (adversarial.student_notebook(LESSON, solved=kind, minimal=True), None) for name, (kind, _) in CLASS.items()}
    adversarial.write(subs, folder)
    return folder


def _graded(log: str) -> set[str]:
    """The students a `lorakit grade` run lists as graded (its per-submission lines)."""
    return {line.split()[0] for line in log.splitlines() if line.startswith("  student")}


def _assert_every_grade_once(url: str, logs: list[str]) -> None:
    """The shards were real (each graded some of the class, no student twice) and the gradebook holds every
    submission once, one grade per test cell, with the score the work earned."""
    graded = [_graded(log) for log in logs]
    assert all(graded), logs
    assert sum(len(g) for g in graded) == len(set().union(*graded)), graded   # no student in two shards
    assert set().union(*graded) == set(CLASS)
    import sqlalchemy as sa
    engine = sa.create_engine(url)
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
    scores = gradebook.read_gradebook(url, LESSON)
    assert scores == {name: earned for name, (_, earned) in CLASS.items()}, scores


def test_two_shards_graded_at_once_into_one_postgres_gradebook(postgres, tmp_path):
    _write_class(tmp_path / "class")
    procs = [subprocess.Popen([sys.executable, "-c", CLI, "grade", LESSON, str(tmp_path / "class"), "--db", postgres,
                               "--shard", f"{i}/2", "--workers", "1", "--out", str(tmp_path / f"out{i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (1, 2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    _assert_every_grade_once(postgres, logs)


# ------------------------------------------------------------------ the cluster job files, run here

# How many of the job's tasks run at once here (a cluster runs all n; this machine has 2 cores). The wall time
# of 1 against 2 at a time is the measurement the shard files are judged by (`pytest -s` prints it).
PROCESSES = int(os.environ.get("LORAKIT_SHARD_PROCESSES", "2"))
SHARDS = 4


def _fresh_database(url: str, name: str) -> str:
    import psycopg2
    import sqlalchemy as sa
    u = sa.engine.make_url(url)
    con = psycopg2.connect(host=u.query["host"], port=int(u.query["port"]), user=u.username, dbname="postgres")
    con.autocommit = True
    con.cursor().execute(f"DROP DATABASE IF EXISTS {name}")
    con.cursor().execute(f"CREATE DATABASE {name}")
    con.close()
    return u.set(database=name).render_as_string(hide_password=False)


def _slurm_tasks(job: Path, url: str) -> list[tuple[list[str], dict, str]]:
    """What Slurm runs for `job`: the script once per index of its `#SBATCH --array=A-B`, with the task's
    environment (SLURM_ARRAY_TASK_ID, and LORAKIT_DB that sbatch passes on)."""
    text = job.read_text()
    first, last = map(int, re.search(r"^#SBATCH --array=(\d+)-(\d+)$", text, re.M).groups())
    cpus = re.search(r"^#SBATCH --cpus-per-task=(\d+)$", text, re.M).group(1)
    env = {**os.environ, "LORAKIT_DB": url, "SLURM_CPUS_PER_TASK": cpus}
    return [(["bash", str(job)], {**env, "SLURM_ARRAY_TASK_ID": str(i)}, str(job.parent)) for i in range(first, last + 1)]


def _kubernetes_pods(job: Path, url: str) -> list[tuple[list[str], dict, str]]:
    """What Kubernetes runs for the Indexed Job in `job`: the container's command and args once per completion
    index (JOB_COMPLETION_INDEX), in its working directory, with its environment (the secret's url: `url`)."""
    import yaml
    doc = yaml.safe_load(job.read_text())
    assert doc["kind"] == "Job" and doc["spec"]["completionMode"] == "Indexed", doc
    pod = doc["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == ("lorakit-gradebook", "url"), ref
            env[item["name"]] = url
    argv = container["command"] + container.get("args", [])
    return [(argv, {**env, "JOB_COMPLETION_INDEX": str(k)}, container["workingDir"])
            for k in range(doc["spec"]["completions"])]


def _run(tasks, at_once: int) -> tuple[list[subprocess.CompletedProcess], float]:
    """Run the tasks as local processes, at most `at_once` at a time; (their results in task order, seconds)."""
    from concurrent.futures import ThreadPoolExecutor
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=at_once) as pool:
        done = list(pool.map(lambda t: subprocess.run(t[0], env=t[1], cwd=t[2], capture_output=True, text=True,
                                                       timeout=900), tasks))
    return done, time.perf_counter() - t0


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["slurm", "kubernetes"])
def test_the_cluster_job_file_grades_every_submission_once(postgres, tmp_path, engine):
    """`lorakit shards ENGINE` renders the job file for 4 shards; its 4 tasks, run here as local processes the
    way the engine would start them, grade the class into one PostgreSQL gradebook, every submission once."""
    url = _fresh_database(postgres, f"shards_{engine}")
    _write_class(tmp_path / "class")
    job = tmp_path / ("grade.sbatch" if engine == "slurm" else "grade-job.yaml")
    res = subprocess.run([sys.executable, "-c", CLI, "shards", engine, LESSON, str(tmp_path / "class"),
                          "--shards", str(SHARDS), "--results", str(tmp_path / "results"), "--out", str(job),
                          *(["--image", "lorakit:tested"] if engine == "kubernetes" else [])],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert url.split("@")[0] not in job.read_text()            # the gradebook's URL is never in the file
    tasks = (_slurm_tasks if engine == "slurm" else _kubernetes_pods)(job, url)
    assert len(tasks) == SHARDS
    done, seconds = _run(tasks, PROCESSES)
    print(f"\n{engine}: {SHARDS} shards of {len(CLASS)} submissions, {PROCESSES} process(es) at a time: {seconds:.1f} s")
    for d in done:
        assert d.returncode == 0, d.stdout + d.stderr
    _assert_every_grade_once(url, [d.stdout for d in done])
