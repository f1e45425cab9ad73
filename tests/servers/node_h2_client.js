// An unmodified Node.js HTTP/2 client over TLS (Node's own OpenSSL, through a memory BIO,
// as @grpc/grpc-js connects): GETs URL, then each further PATH, one after the other on one
// connection, accepting any certificate; prints each status.
// Usage: node node_h2_client.js URL [PATH...]
const http2 = require("http2");
const url = new URL(process.argv[2]);
const paths = [url.pathname, ...process.argv.slice(3)];
const session = http2.connect(url.origin, { rejectUnauthorized: false });
session.on("error", (e) => {
  console.error(String(e));
  process.exit(1);
});
function next(i) {
  if (i === paths.length) {
    session.close();
    return;
  }
  const req = session.request({ ":path": paths[i] });
  req.on("response", (headers) => console.log(headers[":status"]));
  req.resume();
  req.on("end", () => next(i + 1));
}
next(0);
