#if canImport(Glibc)
import Glibc
#endif
import Foundation
import KNet
import Testing

// TCPServer.run / TCPClient.run: the blocking serve calls in async form. They must hold
// no thread of the task pool (which Swift Testing itself runs on), end with the blocking
// call's outcome, and turn the awaiting task's cancellation into close().

/// Counts hops that made it onto the task pool.
actor HopTally {
    private(set) var count = 0
    func bump() { count += 1 }
}

/// Runs `body` in a task and returns the KNetError it throws (nil if it returns, or throws
/// something else).
func outcome(_ body: @escaping @Sendable () async throws -> Void) -> Task<KNetError?, Never> {
    Task {
        do {
            try await body()
            return nil
        } catch {
            return error as? KNetError
        }
    }
}

extension KNetTests {
    @Test("more servers and clients awaited with run() than the pool has threads: every callback's Task hop still runs",
          .timeLimit(.minutes(1)))
    func runHoldsNoPoolThread() async throws {
        let pairs = ProcessInfo.processInfo.activeProcessorCount + 2
        let tally = HopTally()
        let echoes = Locked(0)
        let serverHandler = AwaitableHandler { conn, buf in
            // The answer goes out from the task pool: it needs a free pool thread.
            Task {
                await tally.bump()
                try? conn.send(buf)
            }
        }
        let clientHandler = ClientGreeter(echoes: echoes)
        var servers: [TCPServer] = []
        var clients: [TCPClient] = []
        var tasks: [Task<KNetError?, Never>] = []
        for _ in 0..<pairs {
            let server = TCPServer("127.0.0.1:0")
            servers.append(server)
            tasks.append(outcome { try await server.run(handler: serverHandler) })
        }
        for server in servers {
            let port = try await offPool { try server.waitUntilListening(timeout: .seconds(10)) }
            let client = TCPClient("127.0.0.1:\(port)")
            clients.append(client)
            tasks.append(outcome { try await client.run(handler: clientHandler) })
        }
        #expect(await eventuallyAsync { echoes.withLock { $0 } == pairs })
        #expect(await tally.count == pairs)
        // The clients first, each until its run returned: a client whose server closed
        // first redials, is refused and (retry off) can end with that error before its
        // own task is cancelled.
        var results: [KNetError?] = []
        for task in tasks.reversed() {
            task.cancel()
            results.append(await task.value)
        }
        #expect(results.filter { $0 == .serverClosed }.count == pairs)
        #expect(results.filter { $0 == .clientClosed }.count == pairs)
        // run() returned after every connect(false), as listenAndServe does.
        #expect(serverHandler.downs.withLock { $0 } == pairs)
    }

    @Test("cancelling the task awaiting run() closes the server or client: .serverClosed / .clientClosed after connect(false)")
    func runCancelledClosesAfterDisconnects() async throws {
        let server = TCPServer("127.0.0.1:0")
        let handler = AwaitableHandler()
        let serving = outcome { try await server.run(handler: handler) }
        let port = try await offPool { try server.waitUntilListening(timeout: .seconds(10)) }
        let peer = PeerBox(peer: try PlainSocket(port: port))
        #expect(await handler.until { $0.conns.withLock { $0.count } == 1 })
        serving.cancel()
        #expect(await serving.value == .serverClosed)
        #expect(handler.downs.withLock { $0 } == 1)
        #expect(try await offPool { try peer.peer.read() } == [])

        let silent = try SilentListener() // completes the handshake, never reads
        let client = TCPClient("127.0.0.1:\(silent.port)")
        let clientHandler = AwaitableHandler()
        let dialing = outcome { try await client.run(handler: clientHandler) }
        #expect(await clientHandler.until { $0.conns.withLock { $0.count } == 1 })
        dialing.cancel()
        #expect(await dialing.value == .clientClosed)
        #expect(clientHandler.downs.withLock { $0 } == 1)
        #expect(client.connection == nil)
    }

    @Test("run() in a task cancelled before it starts: throws .serverClosed / .clientClosed at once, never listens or dials")
    func runCancelledBeforeStart() async throws {
        let server = TCPServer("127.0.0.1:0")
        let serving = outcome {
            withUnsafeCurrentTask { $0?.cancel() }
            try await server.run()
        }
        #expect(await serving.value == .serverClosed)
        #expect(server.port == 0)

        let silent = try SilentListener()
        let client = TCPClient("127.0.0.1:\(silent.port)")
        let handler = AwaitableHandler()
        let dialing = outcome {
            withUnsafeCurrentTask { $0?.cancel() }
            try await client.run(handler: handler)
        }
        #expect(await dialing.value == .clientClosed)
        #expect(handler.conns.withLock { $0.count } == 0)
    }

    @Test("run() throws what the blocking call throws: a bad address, a refused dial with retry off, a second serve")
    func runThrowsTheBlockingCallsErrors() async throws {
        #expect(await outcome { try await TCPServer("no port here").run() }.value == .invalidAddress)

        let closed = try ReservedPort() // bound, not listening: connects are refused
        let refused = TCPClient("127.0.0.1:\(closed.port)")
        #expect(await outcome { try await refused.run() }.value == .system(errno: ECONNREFUSED))

        let server = TCPServer("127.0.0.1:0")
        let serving = outcome { try await server.run() }
        _ = try await offPool { try server.waitUntilListening(timeout: .seconds(10)) }
        #expect(await outcome { try await server.run() }.value == .busy)
        serving.cancel()
        #expect(await serving.value == .serverClosed)
    }
}

/// A client handler that sends one frame on connect(true) and counts the echoes.
final class ClientGreeter: TCPHandler {
    let echoes: Locked<Int>
    init(echoes: Locked<Int>) { self.echoes = echoes }
    func connect(_ conn: TCPConnection, connected: Bool) {
        if connected { try? conn.send([1, 2, 3]) }
    }
    func receive(_ conn: TCPConnection, _ buf: [UInt8]) {
        echoes.withLock { $0 += buf.count == 3 ? 1 : 0 }
    }
}
