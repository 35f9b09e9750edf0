// knet-pingpong: the raw-echo throughput test (knet's pingpong test) as a program.
//
//   knet-pingpong                                   server + clients in one process
//   knet-pingpong server PORT THREADS               echo server until SIGINT/SIGTERM
//   knet-pingpong client PORT CONNS BLOCK SECONDS THREADS
//   options: --host H (default 127.0.0.1); for the one-process run also --conns N,
//   --block BYTES, --seconds S, --threads N (or KNET_PINGPONG_CONNS/_BLOCK/_SECONDS/_THREADS).
//
// Protocol: the server echoes everything; each client connection sends one block
// (byte i = i % 128) when it connects, then echoes whatever it reads.
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Dispatch
import Foundation
import KNet
import Synchronization

/// Client connections that closed before the end of the run (knet's persistent client
/// would redial at once and hide the loss), and whether the end has come.
let lostConnections = Atomic<Int>(0)
let stoppingClients = Atomic<Bool>(false)

/// Echoes every received buffer back (the server side).
struct EchoHandler: TCPHandler {
    func receive(_ conn: TCPConnection, _ buf: [UInt8]) {
        try? conn.send(buf)
    }
}

// LoopCounter (the per-thread counters): LoopCounter.swift, shared with the other Swift contender.

/// The client side of one connection: sends the block on connect, then echoes and counts
/// what it reads in its loop thread's counter.
final class PingPongHandler: TCPHandler {
    let block: [UInt8]
    /// Signalled once the connection is up.
    let connected = DispatchSemaphore(value: 0)

    init(block: [UInt8]) {
        self.block = block
    }

    func connect(_ conn: TCPConnection, connected: Bool) {
        if connected {
            _ = LoopCounter.current // registered before the count starts
            try? conn.send(block)
            self.connected.signal()
        } else if !stoppingClients.load(ordering: .relaxed) {
            lostConnections.add(1, ordering: .relaxed)
        }
    }

    func receive(_ conn: TCPConnection, _ buf: [UInt8]) {
        LoopCounter.add(buf.count)
        try? conn.send(buf)
    }
}

func fail(_ message: String) -> Never {
    var stderr = FileHandle.standardError
    print("knet-pingpong: \(message)", to: &stderr)
    exit(2)
}

extension FileHandle: @retroactive TextOutputStream {
    public func write(_ string: String) { write(Data(string.utf8)) }
}

/// Runs `body` on a new thread; the returned semaphore is signalled when it returns.
func spawn(_ body: @escaping @Sendable () -> Void) -> DispatchSemaphore {
    let done = DispatchSemaphore(value: 0)
    let thread = Thread {
        body()
        done.signal()
    }
    thread.stackSize = 1 << 20
    thread.start()
    return done
}

func setThreads(_ threads: Int) {
    do { try setLoopThreads(threads) } catch { fail("cannot set \(threads) loop threads: \(error)") }
}

/// "host:port", with an IPv6 host in brackets as knet expects.
func formatAddress(_ host: String, _ port: Int) -> String {
    host.contains(":") && !host.hasPrefix("[") ? "[\(host)]:\(port)" : "\(host):\(port)"
}

/// Runs CONNS clients against host:port for `seconds` and prints the four result lines.
func runClients(host: String, port: Int, conns: Int, blockSize: Int, seconds: Double) {
    let block = (0..<blockSize).map { UInt8($0 % 128) }
    let handlers = (0..<conns).map { _ in PingPongHandler(block: block) }
    let clients = (0..<conns).map { _ in TCPClient(formatAddress(host, port)) }
    // One at a time, each once the one before has connected: client connection i lands on
    // client loop i % THREADS and, accepted in the same order, pairs with one server loop,
    // as in the other contenders. Racing dials would pair loops at random (run-to-run noise).
    let finished = zip(clients, handlers).map { client, handler in
        let done = spawn {
            client.disableRetry()
            do {
                try client.dialAndServe(handler: handler, codec: nil)
            } catch KNetError.clientClosed {
            } catch {
                fail("client: \(error)")
            }
        }
        if handler.connected.wait(timeout: .now() + 30) == .timedOut { fail("client: no connection in 30 s") }
        return done
    }
    // Counted from the moment every connection is up.
    let start = LoopCounter.totals()
    Thread.sleep(forTimeInterval: seconds) // the measuring period itself
    let end = LoopCounter.totals()
    let bytes = end.bytes - start.bytes, messages = end.messages - start.messages
    stoppingClients.store(true, ordering: .relaxed)
    for client in clients { client.close() }
    for done in finished { done.wait() }
    // The same four lines, and the same arithmetic, as the C knet_pingpong.
    print("\(bytes) total bytes read")
    print("\(messages) total messages read")
    print("\(messages == 0 ? 0 : bytes / messages) average message size")
    print(String(format: "%.1f MiB/s throughput", Double(bytes) / seconds / 1_048_576))
    let lost = lostConnections.load(ordering: .relaxed)
    if lost > 0 {
        fail("\(lost) of \(conns) connections closed during the run")
    }
}

/// Starts an echo server on host:port in the background and returns it once listening.
func startServer(host: String, port: Int) -> (TCPServer, DispatchSemaphore) {
    let server = TCPServer(formatAddress(host, port))
    let done = spawn {
        // A listen error is thrown here and by waitUntilListening below: reported there,
        // once (two threads printing it raced to exit).
        _ = try? server.listenAndServe(handler: EchoHandler(), codec: nil)
    }
    do { try server.waitUntilListening(timeout: .seconds(10)) } catch { fail("server: \(error)") }
    return (server, done)
}

// ---------------------------------------------------------------- arguments

var positional: [String] = []
var options: [String: String] = [:]
do {
    var arguments = CommandLine.arguments.dropFirst()
    while let argument = arguments.popFirst() {
        if argument.hasPrefix("--") {
            guard let value = arguments.popFirst() else { fail("\(argument) needs a value") }
            options[String(argument.dropFirst(2))] = value
        } else {
            positional.append(argument)
        }
    }
}
let host = options["host"] ?? "127.0.0.1"

/// The ranges the C knet_pingpong takes too (THREADS: knet's bound on loop threads, as
/// for KNET_LOOP_THREADS); out of range is a usage error, never a trap further on.
let portRange = 1...65535, threadRange = 1...1024, countRange = 1...1_000_000_000

func number(_ text: String?, _ name: String, _ range: ClosedRange<Int>) -> Int {
    guard let text, let value = Int(text), range.contains(value) else {
        fail("bad \(name): \(text ?? "missing") (expected \(range.lowerBound)...\(range.upperBound))")
    }
    return value
}

/// Seconds to run: finite and positive (inf would never end, 0 divides by zero).
func seconds(_ text: String, _ name: String) -> Double {
    guard let value = Double(text), value.isFinite, value > 0, value <= 1e9 else {
        fail("bad \(name): \(text) (expected seconds > 0)")
    }
    return value
}

/// A one-process setting: --name, else KNET_PINGPONG_NAME, else nil (the default).
func setting(_ name: String, _ options: [String: String]) -> String? {
    options[name] ?? ProcessInfo.processInfo.environment["KNET_PINGPONG_\(name.uppercased())"]
}

switch positional.first {
case "server":
    guard positional.count == 3 else { fail("usage: knet-pingpong server PORT THREADS [--host H]") }
    let port = number(positional[1], "PORT", 0...65535) // 0: a kernel-chosen port, printed
    setThreads(number(positional[2], "THREADS", threadRange))
    // Block the stop signals before any thread exists, then wait for one here.
    var signals = sigset_t()
    sigemptyset(&signals)
    sigaddset(&signals, SIGINT)
    sigaddset(&signals, SIGTERM)
    pthread_sigmask(SIG_BLOCK, &signals, nil)
    let (server, done) = startServer(host: host, port: port)
    var stderr = FileHandle.standardError
    print("knet-pingpong server listening on \(host):\(server.port)", to: &stderr)
    var received: Int32 = 0
    sigwait(&signals, &received)
    server.close()
    done.wait()
case "client":
    guard positional.count == 6 else {
        fail("usage: knet-pingpong client PORT CONNS BLOCK SECONDS THREADS [--host H]")
    }
    let port = number(positional[1], "PORT", portRange)
    let conns = number(positional[2], "CONNS", countRange)
    let block = number(positional[3], "BLOCK", countRange)
    let duration = seconds(positional[4], "SECONDS")
    setThreads(number(positional[5], "THREADS", threadRange))
    runClients(host: host, port: port, conns: conns, blockSize: block, seconds: duration)
case nil:
    let threads = setting("threads", options).map { number($0, "threads", threadRange) } ?? 0 // 0: online CPUs
    let conns = setting("conns", options).map { number($0, "conns", countRange) } ?? 10
    let block = setting("block", options).map { number($0, "block", countRange) } ?? 16384
    let duration = setting("seconds", options).map { seconds($0, "seconds") } ?? 10
    setThreads(threads)
    let (server, done) = startServer(host: host, port: 0)
    runClients(host: host, port: server.port, conns: conns, blockSize: block, seconds: duration)
    server.close()
    done.wait()
default:
    fail("usage: knet-pingpong [server PORT THREADS | client PORT CONNS BLOCK SECONDS THREADS] [--host H]")
}
