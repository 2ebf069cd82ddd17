#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for the tests marked `slurm` and for trying
# `torchx run -s slurm` before a cluster: installs Debian's Slurm, MUNGE and MariaDB when they are
# missing, writes a configuration for this host and starts the daemons (munged, mariadbd, slurmdbd,
# slurmctld, slurmd) that are not running. Idempotent: run it again at any time; it exits 0 once
# `sinfo` shows the node idle and `sacct` answers (TorchX's Slurm scheduler reads job state with
# sacct, so accounting must be up). Needs root. Exit 3: this machine cannot run it (not root, no apt).
#
#   sudo scripts/local_slurm.sh            # then: torchx run -s slurm launch/components.py:dlrm -j 1x2 ...
#
# The node declares SLURM_CPUS CPUs (default 16) and SLURM_MEM_MB memory (default 65536) whatever the
# machine has (SlurmdParameters=config_overrides), so multi-rank jobs and their resource requests
# run on small machines too.
set -euo pipefail

CPUS="${SLURM_CPUS:-16}"
MEM_MB="${SLURM_MEM_MB:-65536}"
HOST="$(hostname -s)"
CONF=/etc/slurm
LOG=/var/log/slurm
DB_PASS=multihash

say() { echo "local_slurm: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
  say "needs root (it installs packages and starts daemons)"
  exit 3
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null || ! command -v munged >/dev/null; then
  if ! command -v apt-get >/dev/null; then
    say "Slurm is not installed and there is no apt-get to install it"
    exit 3
  fi
  say "installing slurmctld slurmd slurm-client slurmdbd munge mariadb-server"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q slurmctld slurmd slurm-client slurmdbd munge mariadb-server >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q slurmctld slurmd slurm-client slurmdbd munge mariadb-server >/dev/null; } \
    || { say "apt-get could not install Slurm"; exit 3; }
fi

mkdir -p "$CONF" "$LOG" /var/spool/slurmctld /var/spool/slurmd /run/munge /run/mysqld /run/slurm
chown slurm:slurm "$LOG" /var/spool/slurmctld /run/slurm
chown munge:munge /run/munge
chown mysql:mysql /run/mysqld

# --- MUNGE (authentication between the daemons and the client commands)
[ -s /etc/munge/munge.key ] || { mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- munged

# --- MariaDB, the accounting database slurmdbd writes to
if ! pgrep -x mariadbd >/dev/null; then
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null
  (mariadbd-safe --user=mysql >/dev/null 2>&1 &)
  for _ in $(seq 60); do mariadb -e "select 1" >/dev/null 2>&1 && break; sleep 1; done
fi
mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

# --- configuration (rewritten when the host, CPUs or memory change)
cat > "$CONF/slurmdbd.conf.new" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
LogFile=$LOG/slurmdbd.log
PidFile=/run/slurm/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
cat > "$CONF/slurm.conf.new" <<EOF
ClusterName=multihash
SlurmctldHost=$HOST
AuthType=auth/munge
SlurmUser=slurm
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
changed=0
for f in slurm.conf slurmdbd.conf; do
  if cmp -s "$CONF/$f.new" "$CONF/$f"; then rm "$CONF/$f.new"; else mv "$CONF/$f.new" "$CONF/$f"; changed=1; fi
done
chown slurm:slurm "$CONF/slurmdbd.conf" && chmod 600 "$CONF/slurmdbd.conf"
if [ "$changed" = 1 ]; then  # daemons started with another configuration: restart them
  pkill -x slurmd || true; pkill -x slurmctld || true; pkill -x slurmdbd || true; sleep 1
fi

# --- the Slurm daemons
pgrep -x slurmdbd >/dev/null || slurmdbd
for _ in $(seq 30); do sacctmgr -n show cluster >/dev/null 2>&1 && break; sleep 1; done
sacctmgr -i -Q add cluster multihash >/dev/null 2>&1 || true
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
  state="$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)"
  case "$state" in
    idle*|mixed*|allocated*) break ;;
    down*|drain*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 1
done
state="$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)"
if ! sacct -n -X -S now >/dev/null 2>&1; then
  say "sacct does not answer: see $LOG/slurmdbd.log"
  exit 1
fi
case "$state" in
  idle*|mixed*|allocated*) say "node $HOST is $state ($CPUS CPUs, $MEM_MB MB declared); accounting is up" ;;
  *) say "node $HOST is '${state:-unknown}': see $LOG/slurmctld.log and $LOG/slurmd.log"; exit 1 ;;
esac
