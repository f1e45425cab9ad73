// An unmodified Node.js `http` server used as an observed service.
// Usage: node node_server.js PORT [BIND]. Routes: /status/<code>, /bytes/<n>, else 200 "ok".
// Prints "listening" once the socket accepts connections.
const http = require("http");
const port = Number(process.argv[2]);
const bind = process.argv[3] || "127.0.0.1";
const server = http.createServer((req, res) => {
  const parts = req.url.split("?")[0].split("/").filter(Boolean);
  if (parts[0] === "status" && parts[1]) {
    res.writeHead(Number(parts[1]), { "Content-Type": "text/plain" });
    return res.end(`status ${parts[1]}\n`);
  }
  if (parts[0] === "bytes" && parts[1]) {
    const body = Buffer.alloc(Number(parts[1]), "x");
    res.writeHead(200, { "Content-Length": body.length });
    return res.end(body);
  }
  res.writeHead(200, { "Content-Type": "text/plain" });
  res.end("ok\n");
});
server.listen(port, bind, () => console.log("listening"));
process.on("SIGTERM", () => server.close(() => process.exit(0)));
