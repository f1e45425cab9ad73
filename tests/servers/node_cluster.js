// Node's `cluster` module: the primary forks WORKERS workers, which all serve one port.
// Usage: node node_cluster.js PORT [WORKERS]. Answers "worker <pid>". The primary prints
// "listening" once every worker listens.
const cluster = require("cluster");
const http = require("http");
const port = Number(process.argv[2]);
const workers = Number(process.argv[3] || 2);
if (cluster.isPrimary) {
  let up = 0;
  for (let i = 0; i < workers; i++) {
    cluster.fork().on("listening", () => {
      if (++up === workers) console.log("listening");
    });
  }
  process.on("SIGTERM", () => {
    for (const id in cluster.workers) cluster.workers[id].kill();
    process.exit(0);
  });
} else {
  http
    .createServer((req, res) => {
      res.writeHead(200, { "Content-Type": "text/plain" });
      res.end(`worker ${process.pid}`);
    })
    .listen(port, "127.0.0.1");
}
