// An unmodified Node.js HTTP/2 client over TLS (Node's own OpenSSL, through a memory BIO,
// as @grpc/grpc-js connects): GET URL once, accepting any certificate; prints the status.
// Usage: node node_h2_client.js URL
const http2 = require("http2");
const url = new URL(process.argv[2]);
const session = http2.connect(url.origin, { rejectUnauthorized: false });
session.on("error", (e) => {
  console.error(String(e));
  process.exit(1);
});
const req = session.request({ ":path": url.pathname });
req.on("response", (headers) => console.log(headers[":status"]));
req.resume();
req.on("end", () => session.close());
