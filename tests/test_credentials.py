"""Unit tests of hvdkit.tracking._credentials and the places that use it: URI masking, the secrets
a multi-host launcher keeps, credentials-file permissions, the spool's metadata, `hvdkit ui`'s and
`doctor`'s output, and the ssh / env command lines of Horovod's runner under hvdkit's shim."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hvdkit.errors import HvdkitError, LaunchError, TrackingError
from hvdkit.tracking import _credentials as C

PW = "s3cr:et@pa ss"  # a ":" and an "@" inside: the password must still be masked whole


# -- URIs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("uri, masked", [
    ("postgresql+psycopg2://mlflow:hunter2@db:5432/mlflow", "postgresql+psycopg2://mlflow:***@db:5432/mlflow"),
    ("http://alice:pw@mlflow.example.com:5000", "http://alice:***@mlflow.example.com:5000"),
    ("https://alice:p@ss:w0rd@host/path?x=1", "https://alice:***@host/path?x=1"),
    ("mysql://:onlypw@db/x", "mysql://:***@db/x"),
    ("http://mlflow.example.com:5000", "http://mlflow.example.com:5000"),
    ("http://alice@host:5000", "http://alice@host:5000"),
    ("http://alice:@host", "http://alice:@host"),  # an empty password is none
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("s3://bucket/key", "s3://bucket/key"),
    ("http://host:5000/a@b", "http://host:5000/a@b"),  # an "@" in the path is not userinfo
    ("", ""),
])
def test_mask_uri(uri, masked):
    assert C.mask_uri(uri) == masked
    assert (C.uri_password(uri) is not None) == (masked != uri)
    assert C.mask_uri(masked) == masked  # idempotent
    assert C.uri_password(masked) is None


def test_uri_password_returns_the_whole_password():
    assert C.uri_password("postgresql://u:p@ss:w@rd@db:5432/x") == "p@ss:w@rd"
    assert C.uri_password("http_proxy is http://u:xyz@proxy:3128") == "xyz"


# -- what a multi-host launcher keeps ------------------------------------------------------------
def test_strip_secrets_names_values_and_uris():
    env = {
        "PATH": "/usr/bin", "HOME": "/root", "PWD": "/work", "OLDPWD": "/", "MLFLOW_TRACKING_URI": "http://h:5000",
        "MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": PW, "MLFLOW_TRACKING_TOKEN": "tok",
        "AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "x", "AWS_SESSION_TOKEN": "x",
        "AZURE_STORAGE_ACCESS_KEY": "x", "AZURE_STORAGE_CONNECTION_STRING": "x", "AZURE_CLIENT_SECRET": "x",
        "MY_SERVICE_PASSWORD": "x", "GITHUB_TOKEN": "x", "OPENAI_API_KEY": "x",
        "DATABASE_URL": "postgresql://u:pw@db/x", "https_proxy": "http://u:pw@proxy:3128",
        "VAULT_TOKEN_FILE": "/run/secrets/t", C.ENV_FILE: "/etc/hvdkit/credentials", "TOKENIZERS_PARALLELISM": "false",
        "HOROVOD_FUSION_THRESHOLD": "1", "NO_PROXY": "localhost",
    }
    kept, removed = C.strip_secrets(env)
    assert removed == sorted([
        "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN", "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_CLIENT_SECRET",
        "MY_SERVICE_PASSWORD", "GITHUB_TOKEN", "OPENAI_API_KEY", "DATABASE_URL", "https_proxy"])
    # paths to mounted secrets, ids and ordinary settings go on
    for name in ("PATH", "HOME", "PWD", "OLDPWD", "MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "VAULT_TOKEN_FILE",
                 C.ENV_FILE, "TOKENIZERS_PARALLELISM", "HOROVOD_FUSION_THRESHOLD", "NO_PROXY"):
        assert kept[name] == env[name], name
    assert PW not in json.dumps(kept) and "pw@" not in json.dumps(kept)


def test_username_stays_when_no_password_was_taken():
    kept, removed = C.strip_secrets({"MLFLOW_TRACKING_USERNAME": "alice", "PATH": "/bin"})
    assert kept == {"MLFLOW_TRACKING_USERNAME": "alice", "PATH": "/bin"} and removed == []


# -- credentials files ---------------------------------------------------------------------------
def _write(path, mode, text=f"[mlflow]\nmlflow_tracking_username = trainer\nmlflow_tracking_password = {PW}\n"):
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o440])
def test_private_credentials_files_are_accepted(tmp_path, mode):
    f = _write(tmp_path / "cred", mode)
    src = C.find_source({C.ENV_FILE: str(f)})
    assert (src.kind, src.path, src.user, src.has_password) == ("file", f, "trainer", True)
    assert PW not in src.describe() and str(f) in src.describe() and "trainer" in src.describe()


@pytest.mark.parametrize("mode, says", [(0o644, "others can read it"), (0o604, "others can read it"),
                                        (0o660, "its group can write it"), (0o666, "others can read and write it"),
                                        (0o601, "others can execute it")])
def test_open_credentials_files_are_refused_with_the_chmod(tmp_path, mode, says):
    f = _write(tmp_path / "cred", mode)
    with pytest.raises(TrackingError) as exc:
        C.find_source({C.ENV_FILE: str(f)})
    line = exc.value.one_line()
    assert exc.value.exit_code == 2 and says in line and f"{mode:04o}" in line and f"chmod 600 {f}" in line, line
    assert "\n" not in line and PW not in line


def test_sources_in_mlflows_order(tmp_path):
    home = tmp_path / "home"
    (home / ".mlflow").mkdir(parents=True)
    assert C.find_source({"HOME": str(home)}).kind == "none"
    f = _write(home / ".mlflow" / "credentials", 0o600)
    assert C.find_source({"HOME": str(home)}) == C.Source("file", f, "trainer", True)
    assert C.find_source({"HOME": str(home), "MLFLOW_TRACKING_PASSWORD": PW}).kind == "env"
    assert C.find_source({"HOME": str(home), "MLFLOW_TRACKING_TOKEN": "t"}).kind == "token"
    with pytest.raises(TrackingError, match="No such file"):
        C.find_source({"HOME": str(home), C.ENV_FILE: str(tmp_path / "missing")})
    nopw = _write(tmp_path / "nopw", 0o600, "[mlflow]\nmlflow_tracking_username = trainer\n")
    assert "holds no mlflow_tracking_password" in C.find_source({C.ENV_FILE: str(nopw)}).describe()


@pytest.mark.job
def test_use_credentials_points_mlflow_at_the_named_file_and_says_so(tmp_path):
    """In a fresh process (the choice is made once per process): MLflow's own reader returns the
    file's user and password, the environment holds no password, one line names the file."""
    f = _write(tmp_path / "cred", 0o600)
    code = ("from hvdkit.tracking._uri import resolve_tracking_uri\n"
            "resolve_tracking_uri(); resolve_tracking_uri()\n"
            "from mlflow.utils.credentials import read_mlflow_creds\n"
            "import os; c = read_mlflow_creds(); print(c.username, c.password == os.environ['EXPECT'])\n"
            "print('MLFLOW_TRACKING_PASSWORD' in os.environ)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HOROVOD_"))}
    env.update(MLFLOW_TRACKING_URI="http://127.0.0.1:9", EXPECT=PW, HOME=str(tmp_path), HOROVOD_RANK="0",
               **{C.ENV_FILE: str(f)})
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["trainer", "True", "False"]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("hvdkit: MLflow credentials")]
    assert lines == [f"hvdkit: MLflow credentials: user trainer from the file {f}"], res.stderr
    # another rank or the launcher does not repeat it; a sqlite store takes no credentials at all
    launcher = {k: v for k, v in env.items() if k != "HOROVOD_RANK"}
    for run_env in ({**env, "HOROVOD_RANK": "1"}, launcher, {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=run_env, timeout=120)
        assert res.returncode == 0, res.stderr
        assert "MLflow credentials" not in res.stderr, res.stderr


# -- the spool's metadata --------------------------------------------------------------------------
def test_spool_stores_the_uri_masked_and_sync_gets_it_back_from_the_environment(tmp_path, monkeypatch):
    from hvdkit.tracking._spool import Spool, TargetState

    uri = f"postgresql://mlflow:{PW.replace(' ', '%20')}@db:5432/mlflow"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spool = Spool.create(tmp_path, "job1", uri)
    spool.save_state(uri, TargetState(runs={"parent": "abc"}))
    on_disk = "".join(p.read_text() for p in spool.dir.iterdir() if p.is_file())
    assert "s3cr" not in on_disk and "mlflow:***@db" in on_disk
    assert spool.load_state(uri).runs == {"parent": "abc"}  # the state is found with the real URI
    assert spool.meta()["tracking_uri"] == "postgresql://mlflow:***@db:5432/mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert Spool.open(spool.dir).meta()["tracking_uri"] == uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://mlflow:other@elsewhere/mlflow")
    assert Spool.open(spool.dir).meta()["tracking_uri"] == "postgresql://mlflow:***@db:5432/mlflow"


# -- doctor and ui -------------------------------------------------------------------------------
@pytest.mark.job
def test_doctor_masks_the_password(monkeypatch):
    from hvdkit import doctor

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://mlflow:hunter2@db:5432/mlflow")
    text = doctor.render(doctor.diagnose())
    assert "hunter2" not in text and "postgresql://mlflow:***@db:5432/mlflow" in text


def test_ui_passes_the_store_in_the_environment_not_argv():
    from hvdkit import ui

    uri = "postgresql://mlflow:hunter2@db:5432/mlflow"
    cmd = ui.server_command(5123)
    assert not any("hunter2" in a or "postgresql" in a for a in cmd) and "--backend-store-uri" not in cmd
    assert ui.server_env(uri)["MLFLOW_BACKEND_STORE_URI"] == uri
    # mlflow's CLI takes --backend-store-uri from that variable
    from mlflow.cli import server

    opt = next(p for p in server.params if p.name == "backend_store_uri")
    assert opt.envvar == "MLFLOW_BACKEND_STORE_URI"


def test_ui_of_a_remote_server_prints_no_password(monkeypatch):
    from hvdkit import ui

    monkeypatch.setattr(ui, "experiment_id", lambda uri, exp: "7")
    said = []
    assert ui.serve(tracking_uri="http://alice:hunter2@127.0.0.1:9", open_browser=False, echo=said.append) == 0
    assert said == ["hvdkit: MLflow UI of http://alice:***@127.0.0.1:9: http://127.0.0.1:9/#/experiments/7/runs"]


# -- the launcher and Horovod's runner ---------------------------------------------------------
def _opts(**kw):
    from hvdkit.launch import LaunchOptions

    return LaunchOptions(**kw)


def test_single_host_jobs_keep_their_environment(monkeypatch):
    from hvdkit.launch import worker_env

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PW)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    for opts in (_opts(np=2), _opts(np=2, hosts="localhost:2"), _opts(np=2, hosts="localhost:1,127.0.0.1:1")):
        env = worker_env(opts)
        assert env["MLFLOW_TRACKING_PASSWORD"] == PW and env["MLFLOW_TRACKING_USERNAME"] == "alice"


def test_multi_host_jobs_leave_secrets_on_the_launcher(monkeypatch, capsys):
    from hvdkit.launch import worker_env

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.1:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PW)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "awssecret")
    env = worker_env(_opts(np=2, hosts="localhost:1,node-that-is-not-here.invalid:1"))
    assert not {"MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME", "AWS_SECRET_ACCESS_KEY"} & set(env)
    assert env["MLFLOW_TRACKING_URI"] == "http://10.0.0.1:5000"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_USERNAME" in err
    assert PW not in err
    # --mpi: mpirun's own ssh runs in batch mode too
    assert worker_env(_opts(np=2, hosts="a.invalid:1,b.invalid:1", controller="mpi"))["OMPI_MCA_plm_rsh_agent"] == \
        "ssh -o BatchMode=yes"


def test_multi_host_job_with_a_password_in_the_tracking_uri_is_refused(monkeypatch):
    from hvdkit.launch import worker_env

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:hunter2@10.0.0.1:5000")
    with pytest.raises(LaunchError) as exc:
        worker_env(_opts(np=2, hosts="a.invalid:1,b.invalid:1"))
    line = exc.value.one_line()
    assert "hunter2" not in line and "http://alice:***@10.0.0.1:5000" in line and "credentials file" in line
    # without tracking it is just another secret left behind
    env = worker_env(_opts(np=2, hosts="a.invalid:1,b.invalid:1", track=False))
    assert "MLFLOW_TRACKING_URI" not in env


@pytest.mark.job
def test_horovod_runner_ssh_checks_host_keys_and_env_lines_name_no_secret(monkeypatch):
    """The shim's patches, applied in a fresh process as hvdkit._horovodrun applies them: every ssh
    Horovod builds (checks, task servers, ranks) checks host keys; a rank's `env ...` line holds no
    secret, remote or local."""
    code = r"""
import os
from hvdkit import _horovodrun
from hvdkit.launch import use_host_key_checking
use_host_key_checking(); _horovodrun._keep_secrets_off_command_lines()
from horovod.runner.util.remote import get_remote_command
from horovod.runner import gloo_run
from horovod.runner.common.util.hosts import SlotInfo
print(get_remote_command('true', 'node1', port=2222))
env = {'PATH': '/bin', 'MLFLOW_TRACKING_PASSWORD': os.environ['PW'], 'DB': 'postgresql://u:pw9@db/x', 'KEEP': 'me'}
print(gloo_run._slot_info_to_command_fn('python -m hvdkit.train', env)(SlotInfo('node1', 0, 0, 0, 2, 1, 2)))
"""
    env = {**os.environ, "PW": "pw-" + PW}
    env.pop("OMPI_MCA_plm_rsh_agent", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    ssh, command = res.stdout.strip().splitlines()
    assert ssh.startswith("ssh -o PasswordAuthentication=no -o BatchMode=yes node1") and "StrictHostKeyChecking" not in ssh
    assert "KEEP=me" in command and "HOROVOD_RANK=0" in command
    assert "pw-" not in command and "pw9" not in command and "MLFLOW_TRACKING_PASSWORD" not in command


def test_errors_are_one_line():
    from hvdkit.launch import _credentials_error

    for said in ("hvdkit-cred missing", "hvdkit-cred unreadable", "hvdkit-cred 644 1", "hvdkit-cred 600 0", "junk"):
        err = _credentials_error("node1", "/etc/cred", said)
        assert isinstance(err, HvdkitError) and err.exit_code == 2 and "\n" not in err.one_line()
        assert "node1" in err.one_line() and "fix:" in err.one_line()
    assert _credentials_error("node1", "/etc/cred", "hvdkit-cred 440 1") is None
