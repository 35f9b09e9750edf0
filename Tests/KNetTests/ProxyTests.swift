// knet composed into a TCP relay through the Swift API: a TCPServer whose every
// connection dials its upstream with a TCPClient on a thread of its own (dialAndServe
// from a callback throws EDEADLK), relaying bytes both ways across loops. The C suite's
// test_proxy.c checks the same with more cases.
import Foundation
import KNet
import Testing

/// What the proxy saw, over all its sessions.
final class ProxyStats: Sendable {
    struct State {
        var sessionsEnded = 0
        var upConnects = 0
        var relayedUp = 0
        var relayedDown = 0
        var refused: [KNetError] = []
        var downReasons: [CloseReason] = []
        var upReasons: [CloseReason] = []
    }
    let state = Locked(State())
}

/// One relayed connection: the accepted side, its upstream client and connection.
final class ProxySession: Sendable {
    struct State {
        var up: TCPConnection?
        var early: [UInt8] = []  // what the client sent before the upstream connected
        var downDone = false
        var downReason: CloseReason = .open
        var upReason: CloseReason = .open
        var refs = 2  // the accepted connection until its connect(false), the dial thread
    }
    let down: TCPConnection
    let client: TCPClient
    let stats: ProxyStats
    let state = Locked(State())

    init(down: TCPConnection, client: TCPClient, stats: ProxyStats) {
        self.down = down
        self.client = client
        self.stats = stats
    }

    /// The client's FIN: its bytes still go up, then the upstream is shut down gracefully
    /// (once it is connected: a shutdown would abort the dial and drop the early bytes).
    private func stopUpstream(_ s: State) {
        if s.downReason == .error(.endOfStream) {
            if s.up != nil { client.shutdown(timeout: .seconds(3)) }
        } else {
            client.close()
        }
    }

    /// This proxy does not pause its source (FlowControlTests does): a refused relay send
    /// ends both sides.
    func relay(_ buf: [UInt8], to conn: TCPConnection, upward: Bool) {
        do {
            try conn.send(buf)
            stats.state.withLock { if upward { $0.relayedUp += buf.count } else { $0.relayedDown += buf.count } }
        } catch {
            stats.state.withLock { $0.refused.append(error as? KNetError ?? .codec) }
            down.close()
            client.close()
        }
    }

    func fromDown(_ buf: [UInt8]) {
        let up: TCPConnection? = state.withLock { s in
            if s.up == nil { s.early += buf }
            return s.up
        }
        if let up { relay(buf, to: up, upward: true) }
    }

    func upConnected(_ conn: TCPConnection) {
        state.withLock { s in
            s.up = conn
            if !s.early.isEmpty {
                relay(s.early, to: conn, upward: true)
                s.early = []
            }
            if s.downDone { stopUpstream(s) }
        }
        stats.state.withLock { $0.upConnects += 1 }
    }

    func upEnded(_ conn: TCPConnection) {
        let reason = conn.closeReason
        state.withLock { $0.upReason = reason }
        client.close()  // one upstream connection per session: no re-dial
        if reason == .error(.endOfStream) { down.shutdown() } else { down.close() }
    }

    func downEnded(_ reason: CloseReason) {
        state.withLock { s in
            s.downDone = true
            s.downReason = reason
            stopUpstream(s)
        }
        unref()
    }

    func dialEnded() {
        let noUpstream = state.withLock { !$0.downDone && $0.up == nil }
        if noUpstream { down.close() }
        unref()
    }

    private func unref() {
        let last: State? = state.withLock { s in
            s.refs -= 1
            return s.refs == 0 ? s : nil
        }
        guard let last else { return }
        // Kept past both connect(false)s: sends are refused, the handles stay valid.
        #expect(throws: KNetError.connectionClosed) { try self.down.send([1]) }
        #expect(throws: KNetError.connectionClosed) { try last.up?.send([1]) }
        stats.state.withLock {
            $0.downReasons.append(last.downReason)
            $0.upReasons.append(last.upReason)
            $0.sessionsEnded += 1
        }
    }
}

struct UpstreamHandler: TCPHandler {
    let session: ProxySession
    func connect(_ conn: TCPConnection, connected: Bool) {
        if connected { session.upConnected(conn) } else { session.upEnded(conn) }
    }
    func receive(_ conn: TCPConnection, _ buf: [UInt8]) {
        session.relay(buf, to: session.down, upward: false)
    }
}

struct ProxyHandler: TCPHandler {
    let upstreamPort: Int
    let stats: ProxyStats
    /// Dial through `TCPClient.run` in a Task (it serves on a thread of its own) instead
    /// of `dialAndServe` on a Thread.
    var async = false
    func connect(_ conn: TCPConnection, connected: Bool) {
        if connected {
            let client = TCPClient("127.0.0.1:\(upstreamPort)")
            let session = ProxySession(down: conn, client: client, stats: stats)
            conn.userdata = session
            let handler = UpstreamHandler(session: session)
            if async {
                Task {
                    _ = try? await client.run(handler: handler)
                    session.dialEnded()
                }
            } else {
                Thread {
                    _ = try? client.dialAndServe(handler: handler)
                    session.dialEnded()
                }.start()
            }
        } else {
            (conn.userdata as? ProxySession)?.downEnded(conn.closeReason)
        }
    }
    func receive(_ conn: TCPConnection, _ buf: [UInt8]) {
        (conn.userdata as? ProxySession)?.fromDown(buf)
    }
}

/// Echoes every byte (the upstream of the stream test).
struct EchoHandler: TCPHandler {
    func connect(_ conn: TCPConnection, connected: Bool) {}
    func receive(_ conn: TCPConnection, _ buf: [UInt8]) { try? conn.send(buf) }
}

/// Writes every byte to fd (blocking).
private func sendAll(_ fd: Int32, _ bytes: [UInt8]) throws {
    var offset = 0
    while offset < bytes.count {
        let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + offset, $0.count - offset, Int32(MSG_NOSIGNAL)) }
        if n < 0 {
            if errno == EINTR { continue }
            throw KNetError.system(errno: errno)
        }
        offset += n
    }
}

extension KNetTests {
    @Test("a TCPServer + TCPClient relay: 8 streams of 1 MiB both ways, intact; closes propagate",
          arguments: [false, true])
    func proxyRelaysStreams(async: Bool) throws {
        let echo = try ServerHarness(handler: EchoHandler(), codec: nil)
        let stats = ProxyStats()
        let proxy = try ServerHarness(handler: ProxyHandler(upstreamPort: echo.port, stats: stats, async: async),
                                      codec: nil)
        let streams = 8, size = 1 << 20
        let failures = Locked(0)
        let clients = (0..<streams).map { i in
            Background {
                let socket = try PlainSocket(port: proxy.port)
                let data = pattern(size, offset: i * 7)
                let fd = socket.fd  // PlainSocket is not Sendable; socket outlives the writer
                let writer = Background { try sendAll(fd, data) }
                var got: [UInt8] = []
                got.reserveCapacity(size)
                while got.count < size {
                    let chunk = try socket.read()
                    if chunk.isEmpty { break }
                    got += chunk
                }
                if got != data { failures.withLock { $0 += 1 } }
                if let error = writer.join() { throw error }
            }
        }
        for client in clients { #expect(client.join(timeout: 30) == nil) }
        #expect(failures.withLock { $0 } == 0)
        #expect(eventually(.seconds(20)) { stats.state.withLock { $0.sessionsEnded } == streams })
        let s = stats.state.withLock { $0 }
        #expect(s.refused.isEmpty)
        #expect(s.upConnects == streams)
        #expect(s.relayedUp == streams * size)
        #expect(s.relayedDown == streams * size)
        #expect(s.downReasons.allSatisfy { $0 == .error(.endOfStream) })
        #expect(s.upReasons.allSatisfy { $0 == .local })
        #expect(proxy.stop() == .serverClosed)
        #expect(echo.stop() == .serverClosed)
    }
}
