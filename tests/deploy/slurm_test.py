"""deploy/slurm/epx.sbatch on a real single-node Slurm (Debian's slurm-wlm and munge), started
here as root with a generated slurm.conf. Run by ctest as
    python slurm_test.py EPX_BINARY MODEL_DIR SBATCH_SCRIPT
For each launch (srun: launcher-free, `epx serve --workers` on task 0 and `epx worker` on the
others; mpirun: inside the allocation) the job with 3 tasks prints the address it serves on, a
greedy request through gRPC returns the golden tokens of tests/data, and `scancel` ends every
task of the job."""

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import unittest

import grpc

EPX, MODEL, SBATCH = sys.argv[1], sys.argv[2], sys.argv[3]
del sys.argv[1:4]
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import epx_test_util as util  # noqa: E402  (tests/epx_test_util.py)






def read_tensor(path, name):
    """One tensor of a safetensors file as a list of ints (I32 or I64)."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        meta = header[name]
        begin, end = meta["data_offsets"]
        f.seek(8 + size + begin)
        data = f.read(end - begin)
    fmt = {"I32": "i", "I64": "q"}[meta["dtype"]]
    return list(struct.unpack("<%d%s" % (len(data) // struct.calcsize(fmt), fmt), data))




def read_if_there(path):
    """The file's text; empty while the job has not created it."""
    try:
        return util.read(path)
    except FileNotFoundError:
        return ""


@unittest.skipUnless(os.geteuid() == 0, "a single-node Slurm is started here as root")
@unittest.skipUnless(shutil.which("slurmctld") and shutil.which("munged"),
                     "needs slurm-wlm and munge (deploy/install-deps.sh)")
class SlurmTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="epx_slurm_")
        cls.gen_pb2, cls.gen_grpc = util.proto_stubs(os.path.join(cls.dir, "stubs"),
                                                     "generation")["generation"]
        cls.daemons = []
        cls.addClassCleanup(cls.stop_daemons)
        d = cls.dir
        # munge with a key and socket of its own, so it never meets the host's.
        subprocess.run(["mungekey", "--create", "--keyfile", d + "/munge.key"], check=True)
        cls.socket = d + "/munge.socket"
        subprocess.run(["munged", "--force", "--key-file=" + d + "/munge.key",
                        "--socket=" + cls.socket, "--pid-file=" + d + "/munged.pid",
                        "--log-file=" + d + "/munged.log", "--seed-file=" + d + "/munged.seed"],
                       check=True)
        host = socket.gethostname()
        for sub in ("state", "spool"):
            os.makedirs(os.path.join(d, sub))
        cls.conf = d + "/slurm.conf"
        with open(cls.conf, "w") as f:
            f.write("\n".join([
                "ClusterName=epxtest",
                "SlurmctldHost=%s" % host,
                "SlurmUser=root",
                "SlurmdUser=root",
                "SlurmctldPort=%d" % util.free_port(),
                "SlurmdPort=%d" % util.free_port(),
                "AuthType=auth/munge",
                "AuthInfo=socket=%s" % cls.socket,
                "CredType=cred/munge",
                "StateSaveLocation=%s/state" % d,
                "SlurmdSpoolDir=%s/spool" % d,
                "SlurmctldPidFile=%s/slurmctld.pid" % d,
                "SlurmdPidFile=%s/slurmd.pid" % d,
                "SlurmctldLogFile=%s/slurmctld.log" % d,
                "SlurmdLogFile=%s/slurmd.log" % d,
                # What runs as root in a container: no cgroups.
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "MpiDefault=none",
                "ReturnToService=2",
                "SchedulerType=sched/backfill",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                # More CPUs than the machine has: 3 tasks fit a 2-core CI machine.
                "SlurmdParameters=config_overrides",
                "KillWait=20",
                "NodeName=%s CPUs=8 State=UNKNOWN" % host,
                "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            ]) + "\n")
        cls.env = dict(os.environ, SLURM_CONF=cls.conf)
        for name in ("slurmctld", "slurmd"):
            with open(os.path.join(d, name + ".out"), "w") as log:
                cls.daemons.append(subprocess.Popen([name, "-D", "-f", cls.conf], stdout=log,
                                                    stderr=subprocess.STDOUT, env=cls.env))
        util.poll_until("the node to be idle", 60, lambda: "idle" in cls.slurm(
            "sinfo", "-h", "-o", "%T", check=False))

    @classmethod
    def stop_daemons(cls):
        util.stop(cls.daemons, timeout_s=30)
        subprocess.run(["munged", "--stop", "--socket=" + cls.socket], capture_output=True)

    @classmethod
    def slurm(cls, *args, check=True, env=None):
        r = subprocess.run(list(args), capture_output=True, text=True, env=env or cls.env,
                           timeout=60)
        if check and r.returncode != 0:
            raise AssertionError("%s failed: %s %s" % (args, r.stdout, r.stderr))
        return r.stdout

    def job_processes(self, job):
        """Pids of live processes of the job (SLURM_JOB_ID=job in their environment)."""
        pids = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open("/proc/%s/environ" % pid, "rb") as f:
                    env = f.read().split(b"\0")
                with open("/proc/%s/stat" % pid) as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if b"SLURM_JOB_ID=%d" % job in env and state != "Z":
                pids.append(int(pid))
        return pids

    def run_job(self, launch):
        port, http_port = util.free_port(), util.free_port()
        out = os.path.join(self.dir, "job-%s.out" % launch)
        env = dict(self.env, EPX=EPX, MODEL=MODEL, PORT=str(port), HTTP_PORT=str(http_port),
                   LAUNCH=launch, OMPI_MCA_btl_vader_single_copy_mechanism="none",
                   OMP_NUM_THREADS="1")
        if launch == "mpirun":
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        job = int(self.slurm("sbatch", "--parsable", "-n", "3", "--output", out, SBATCH,
                             env=env).strip().split(";")[0])
        try:
            line = util.poll_until("the job's address in %s" % out, 180, lambda: next(
                (l for l in read_if_there(out).splitlines() if l.startswith("epx: serving on ")), None))
            address = line.split()[3]
            self.assertEqual(address.rsplit(":", 1)[1], str(port), line)
            self.assertIn("2 workers", line)

            # The golden greedy tokens of prompt 0, through the job's gRPC API.
            golden = os.path.join(MODEL, "golden.safetensors")
            prompt = read_tensor(golden, "prompt_0.tokens")
            greedy = read_tensor(golden, "prompt_0.greedy")
            with grpc.insecure_channel(address) as channel:
                stub = self.gen_grpc.GenerationStub(channel)
                request = self.gen_pb2.GenerateRequest(
                    token_ids=self.gen_pb2.TokenIds(ids=prompt), max_tokens=len(greedy),
                    temperature=0, ignore_eos=True)
                tokens = [t for r in stub.Generate(request, timeout=120) for t in r.token_ids]
            self.assertEqual(tokens, greedy)
            stats = json.loads(subprocess.run([EPX, "stats", "--json", "--server", address],
                                              capture_output=True, check=True).stdout)
            self.assertEqual([w["registered"] for w in stats["workers"]], [True, True])
            self.assertGreaterEqual(len(self.job_processes(job)), 3)
        finally:
            self.slurm("scancel", str(job))
            # scancel ends the job and every one of its processes.
            util.poll_until("job %d to leave the queue" % job, 120,
                       lambda: str(job) not in self.slurm("squeue", "-h", "-o", "%i"))
            util.poll_until("job %d's processes to end" % job, 60,
                            lambda: not self.job_processes(job))
        return read_if_there(out)

    def test_launcher_free_with_srun(self):
        out = self.run_job("srun")
        self.assertIn("launch srun", out)
        self.assertIn("epx serve: shutting down", out)
        self.assertEqual(out.count("epx worker: the coordinator ended the job"), 2, out)

    def test_mpirun_inside_the_allocation(self):
        out = self.run_job("mpirun")
        self.assertIn("data plane mpi, launch mpirun", out)


if __name__ == "__main__":
    unittest.main(verbosity=2)
