// An unmodified Node.js client: GET URL N times (a new connection each, or with
// "keepalive" one kept-alive connection), checks each body's length against EXPECTED,
// prints "ok <n>" at the end or exits 1 on the first problem. An https URL is fetched
// through Node's own OpenSSL (a memory BIO), accepting any certificate.
// Usage: node node_fetch.js URL N EXPECTED_BYTES [keepalive]
const [url, n, expected] = [process.argv[2], Number(process.argv[3]), Number(process.argv[4])];
const tls = url.startsWith("https:");
const http = require(tls ? "https" : "http");
const agent = new http.Agent({ keepAlive: process.argv[5] === "keepalive", maxSockets: 1, rejectUnauthorized: false });
let done = 0;
function one() {
  const req = http.get(url, { agent, timeout: 20000 }, (res) => {
    let len = 0;
    res.on("data", (c) => (len += c.length));
    res.on("end", () => {
      if (res.statusCode !== 200 || len !== expected) {
        console.error(`bad response ${res.statusCode} ${len}`);
        process.exit(1);
      }
      if (++done === n) {
        console.log(`ok ${done}`);
        agent.destroy();
      } else {
        one();
      }
    });
  });
  req.on("timeout", () => {
    console.error("timeout");
    process.exit(1);
  });
  req.on("error", (e) => {
    console.error(String(e));
    process.exit(1);
  });
}
one();
