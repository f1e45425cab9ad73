// An unmodified Node.js service that calls a downstream HTTP service for every request.
// Usage: node node_frontend.js PORT DOWNSTREAM_BASE_URL. Prints "listening" when ready.
const http = require("http");
const [port, downstream] = [Number(process.argv[2]), process.argv[3].replace(/\/$/, "")];
const server = http.createServer((req, res) => {
  http
    .get(downstream + req.url, { agent: false }, (up) => {
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
