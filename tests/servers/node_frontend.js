// An unmodified Node.js service that calls a downstream HTTP service for every request.
// Usage: node node_frontend.js PORT DOWNSTREAM_BASE_URL [keepalive]. Prints "listening" when
// ready. Each downstream call has its own connection, or with `keepalive` all of them share
// one pooled connection (a keep-alive Agent with one socket).
const http = require("http");
const [port, downstream] = [Number(process.argv[2]), process.argv[3].replace(/\/$/, "")];
const agent = process.argv[4] === "keepalive" ? new http.Agent({ keepAlive: true, maxSockets: 1 }) : false;
const server = http.createServer((req, res) => {
  http
    .get(downstream + req.url, { agent }, (up) => {
      const chunks = [];
      up.on("data", (c) => chunks.push(c));
      up.on("end", () => {
        const body = Buffer.concat(chunks);
        res.writeHead(up.statusCode, { "Content-Length": body.length });
        res.end(body);
      });
    })
    .on("error", (e) => {
      res.writeHead(502);
      res.end(String(e));
    });
});
server.listen(port, "127.0.0.1", () => console.log("listening"));
process.on("SIGTERM", () => server.close(() => process.exit(0)));
