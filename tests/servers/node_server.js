// An unmodified Node.js `http` (or, with --tls PEM, `https`) server used as an observed
// service. Usage: node node_server.js PORT [BIND] [--tls PEM]. Routes: /status/<code>,
// /bytes/<n>, else 200 "ok". Prints "listening" once the socket accepts connections.
const args = process.argv.slice(2);
const tlsAt = args.indexOf("--tls");
const pem = tlsAt >= 0 ? require("fs").readFileSync(args.splice(tlsAt, 2)[1]) : null;
const port = Number(args[0]);
const bind = args[1] || "127.0.0.1";
const handler = (req, res) => {
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
};
const server = pem
  ? require("https").createServer({ key: pem, cert: pem }, handler)
  : require("http").createServer(handler);
server.listen(port, bind, () => console.log("listening"));
process.on("SIGTERM", () => server.close(() => process.exit(0)));
