# Runs as /init's child inside the VM (see boot.sh); everything it prints goes to
# guest.log, which tests/test_kernels.py reads. Sections start with "=== name".
T=/usr/bin/tapir
W=/tmp/w
mkdir -p $W

# Runs "$@" every 0.1 s until it succeeds or $1 seconds have passed; leaves the tenths of
# a second waited in $waited.
poll() {
    limit=$(($1 * 10))
    shift
    waited=0
    while [ $waited -lt $limit ] && ! "$@"; do
        sleep 0.1
        waited=$((waited + 1))
    done
}
exited() { ! kill -0 "$1" 2>/dev/null; }
listening() { grep -q ":$1 00000000:0000 0A" /proc/net/tcp; }
agent_ready() { grep -q ' ready: ' $W/run.err; }
ready_or_exited() { agent_ready || exited "$1"; }

# Waits up to $2 seconds for child $1 to exit and returns its status. One that is still
# running is shown ("=== $3 still running": each thread's kernel stack, and the kernel's
# list of blocked tasks on the console), then killed: a hang fails the test with where it
# hung instead of running into boot.sh's timeout.
wait_bounded() {
    poll "$2" exited "$1"
    if ! exited "$1"; then
        echo "=== $3 still running after $2 s"
        for t in /proc/"$1"/task/*; do
            echo "--- thread $(cat "$t"/comm) state $(awk '/^State/{print $2}' "$t"/status)"
            cat "$t"/stack
        done
        echo w >/proc/sysrq-trigger
        kill -9 "$1"
    fi
    wait "$1"
}

# One request with curl's arguments "$@", printed as "=== curl STATUS"; one that got no
# response (000) is followed by the VM's TCP sockets, to show where it stopped.
get() {
    code=$(curl -s -m 30 -o /dev/null -w '%{http_code}' "$@")
    echo "=== curl $code"
    [ "$code" != 000 ] || netstat -tn
}

echo "=== kernel $(uname -r)"
echo "=== doctor"
$T doctor &
wait_bounded $! 120 doctor
echo "=== doctor exit $?"
python3 -m http.server 18080 --bind 127.0.0.1 --directory /etc >$W/http.log 2>&1 &
# Listening before the agent starts (port 18080 is 46A0 in /proc/net/tcp, state 0A is
# LISTEN), so that the first curl finds the server however fast the agent gets ready.
poll 60 listening 46A0
# The agent as the README runs it (traceparent injection on), spans on stdout.
$T run --exporter console --port 18080 >$W/run.out 2>$W/run.err &
AGENT=$!
# Under emulation loading takes seconds (7-18 s here); wait up to 120 s for the ready line
# (or the agent's exit).
poll 120 ready_or_exited $AGENT
if agent_ready; then
    echo "=== ready after $((waited / 10)) s"
    get http://127.0.0.1:18080/hostname
    get http://127.0.0.1:18080/missing
    get -H 'traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01' \
        http://127.0.0.1:18080/hosts
fi
kill -INT $AGENT
wait_bounded $AGENT 60 agent
echo "=== agent exit $?"
echo "=== spans"
cat $W/run.out
echo "=== agent log"
cat $W/run.err
