#!/usr/bin/env bash
# Bring up a real single-host SLURM cluster (Debian bookworm slurm-wlm 22.05 + munge), no systemd, as root.
# Used by .ci/run for tests/test_slurm_live.py (which look for ClusterName=jambatrain-ci); also a way to try
# launch/slurm.sbatch and hydra/launcher=slurm_cpu on one box. Writes /etc/slurm/slurm.conf and, for two nodes,
# '127.0.0.1 n1 n2' to /etc/hosts.
#   SLURM_CI_NODES=2 (default): two emulated nodes n1,n2 (one slurmd each, 1 CPU each on a 2-core box)
#   SLURM_CI_NODES=1          : one node named after this host with all its CPUs
# State, logs and pid files under $SLURM_CI_DIR (default /tmp/slurm-ci). Tear down: .ci/slurm_down.sh
set -euo pipefail
BASE=${SLURM_CI_DIR:-/tmp/slurm-ci}
NODES=${SLURM_CI_NODES:-2}
HOST=$(hostname -s)
NCPU=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))   # a bit below actual

# 1. packages (~16 s after apt-get update on a fresh Debian 12 box)
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
fi

# a cluster already up from an earlier call is stopped first
[ -s "$BASE/run/slurmctld.pid" ] && bash "$(dirname "$0")/slurm_down.sh"

# 2. munge: the Debian postinst creates /etc/munge/munge.key; make one if it is missing
[ -s /etc/munge/munge.key ] || { mungekey -c -k /etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; }
install -d -o munge -g munge -m 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
fi
munge -n | unmunge >/dev/null   # fails the script if munge does not work

# 3. config
rm -rf "$BASE/state" "$BASE/log" && mkdir -p "$BASE"/{state/ctld,state/d,log,run} /etc/slurm
if [ "$NODES" = 2 ]; then
  grep -qE '^127\.0\.0\.1[[:space:]]+n1 n2$' /etc/hosts || echo '127.0.0.1 n1 n2' >> /etc/hosts  # node names must resolve (MASTER_ADDR=n1)
  NODE_LINE="NodeName=n[1-2] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001-17002 CPUs=$(( NCPU / 2 )) RealMemory=$(( MEM_MB / 2 )) State=UNKNOWN"
else
  NODE_LINE="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NCPU RealMemory=$MEM_MB State=UNKNOWN"
fi
cat > /etc/slurm/slurm.conf <<EOF
ClusterName=jambatrain-ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# requeued jobs wait cred_expire+1 s before they may start again (default 120)
AuthInfo=cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/d/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=30
$NODE_LINE
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

# 4. daemons (they daemonize themselves; pids in $BASE/run)
slurmctld
if [ "$NODES" = 2 ]; then slurmd -N n1; slurmd -N n2; else slurmd; fi
for _ in $(seq 60); do
  [ "$(sinfo -h -t idle -o %D 2>/dev/null | awk '{s+=$1} END {print s+0}')" = "$NODES" ] && break
  sleep 0.5
done
sinfo
[ "$(sinfo -h -t idle -o %D | awk '{s+=$1} END {print s+0}')" = "$NODES" ] || { echo "slurm: nodes not idle" >&2; tail -n 20 "$BASE"/log/*.log >&2; exit 1; }
