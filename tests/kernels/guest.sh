# Runs as /init's child inside the VM (see boot.sh); everything it prints goes to
# guest.log, which tests/test_kernels.py reads. Sections start with "=== name".
T=/usr/bin/tapir
W=/tmp/w
mkdir -p $W
echo "=== kernel $(uname -r)"
echo "=== doctor"
$T doctor
echo "=== doctor exit $?"
python3 -m http.server 18080 --bind 127.0.0.1 --directory /etc >$W/http.log 2>&1 &
# The agent as the README runs it (traceparent injection on), spans on stdout.
$T run --exporter console --port 18080 >$W/run.out 2>$W/run.err &
AGENT=$!
# Under emulation the verifier takes tens of seconds; wait for the ready line (or exit).
i=0
while [ $i -lt 3000 ] && kill -0 $AGENT 2>/dev/null && ! grep -q ready $W/run.err; do
    sleep 0.1
    i=$((i + 1))
done
if grep -q ready $W/run.err; then
    echo "=== ready after $((i / 10)) s"
    curl -s -o /dev/null -w '=== curl %{http_code}\n' http://127.0.0.1:18080/hostname
    curl -s -o /dev/null -w '=== curl %{http_code}\n' http://127.0.0.1:18080/missing
    curl -s -o /dev/null -w '=== curl %{http_code}\n' \
        -H 'traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01' \
        http://127.0.0.1:18080/hosts
fi
kill -INT $AGENT
wait $AGENT
echo "=== agent exit $?"
echo "=== spans"
cat $W/run.out
echo "=== agent log"
cat $W/run.err
