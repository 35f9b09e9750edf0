#if canImport(Glibc)
import Glibc
#endif
import KNet
import Testing

// The lifetimes the Swift layer manages by hand (Unmanaged references parked in the C
// userdata, the serve context and codec box the C core points at, per-thread scratch
// slots), pushed to their edges from other threads. Meant to be run under
// `--sanitize=address` (scripts/swift-sanitize.sh address) as much as plainly: a use after free shows
// there as a report, here only maybe as a crash.

/// A handler that keeps every connection it served (so they outlive their serve call).
final class KeepingHandler: TCPHandler {
    let conns = Locked<[TCPConnection]>([])
    let disconnects = Locked(0)
    func connect(_ conn: TCPConnection, connected: Bool) {
        if connected {
            conns.withLock { $0.append(conn) }
        } else {
            disconnects.withLock { $0 += 1 }
        }
    }
    func receive(_ conn: TCPConnection, _ buf: [UInt8]) {}
}

/// Counts live instances, so a test can see every one freed.
final class LiveCounter: Sendable {
    let live = Locked(0)
}

/// A userdata value that keeps its connection and uses it in deinit.
final class ConnKeeper: Sendable {
    let conn: TCPConnection
    let counter: LiveCounter
    init(_ conn: TCPConnection, _ counter: LiveCounter) {
        self.conn = conn
        self.counter = counter
        counter.live.withLock { $0 += 1 }
    }
    deinit {
        _ = conn.userdata
        _ = conn.closeReason
        counter.live.withLock { $0 -= 1 }
    }
}

/// An object the test can drop on a loop thread (through a connection's userdata).
final class Holder: Sendable {
    let server: TCPServer?
    let client: TCPClient?
    init(server: TCPServer? = nil, client: TCPClient? = nil) {
        self.server = server
        self.client = client
    }
}

extension KNetTests {
    @Test("sends from threads on kept connections race the server's close and go on after the server, handler and codec are dropped",
          arguments: ChurnCodec.allCases)
    func keptConnectionSendsRaceServeEnd(codec: ChurnCodec) throws {
        weak var weakServer: TCPServer?
        weak var weakHandler: KeepingHandler?
        var conns: [TCPConnection] = []
        var peers: [PlainSocket] = []
        let stopSending = Locked(false)
        let closedSeen = Locked(0)
        var senders: [Background] = []
        do {
            let handler = KeepingHandler()
            let server = try ServerHarness(handler: handler, codec: codec.make())
            weakServer = server.server
            weakHandler = handler
            for _ in 0..<4 { peers.append(try PlainSocket(port: server.port)) }
            #expect(eventually { handler.conns.withLock { $0.count } == 4 })
            conns = handler.conns.withLock { $0 }
            for t in 0..<3 {
                let mine = conns
                senders.append(Background {
                    let message = [UInt8](repeating: UInt8(t), count: 100 + t)
                    var closed = Set<Int>()
                    var after = 0
                    // Until every connection refused a send, and then 200 more sends each.
                    while after < 200 {
                        for (i, conn) in mine.enumerated() {
                            do { try conn.send(message) } catch KNetError.connectionClosed {
                                closed.insert(i)
                            } catch KNetError.pendingSendFull {}
                        }
                        if closed.count == mine.count { after += 1 }
                        if stopSending.withLock({ $0 }) { break }
                    }
                    closedSeen.withLock { $0 += closed.count }
                })
            }
            usleep(20_000) // let the senders run before the close (not a synchronisation)
            #expect(server.stop() == .serverClosed)
            #expect(handler.disconnects.withLock { $0 } == 4)
            handler.conns.withLock { $0.removeAll() }
        }
        // The serve call returned and its context went with it: the server, its handler and
        // the codec it was given are dropped while the threads still send on their connections.
        #expect(eventually { weakServer == nil && weakHandler == nil })
        for sender in senders { #expect(sender.join(timeout: 30) == nil) }
        stopSending.withLock { $0 = true }
        #expect(closedSeen.withLock { $0 } == 3 * 4)
        for conn in conns { #expect(conn.closeReason == .error(.serverClosed)) }
        weak let weakConn = conns.first
        conns.removeAll()
        senders.removeAll() // their closures hold the connections too
        #expect(eventually { weakConn == nil })
        _ = peers
    }

    @Test("TCPClient.connection taken, used and dropped from threads while every connection is closed at once and redialed")
    func clientConnectionRacesConnectFalse() throws {
        struct CloseAtOnce: TCPHandler {
            func connect(_ conn: TCPConnection, connected: Bool) {
                if connected { conn.close() }
            }
        }
        let server = try ServerHarness(handler: CloseAtOnce(), codec: nil)
        let counter = LiveCounter()
        let dialed = Locked(0)
        struct CountingHandler: TCPHandler {
            let dialed: Locked<Int>
            func connect(_ conn: TCPConnection, connected: Bool) {
                if connected { dialed.withLock { $0 += 1 } }
            }
        }
        let client = ClientHarness(port: server.port, handler: CountingHandler(dialed: dialed), codec: StdCodec(),
                                   retry: true)
        let done = Locked(false)
        let used = Locked(0)
        var users: [Background] = []
        for _ in 0..<2 {
            users.append(Background { [client] in
                while !done.withLock({ $0 }) {
                    guard let conn = client.client.connection else {
                        sched_yield()
                        continue
                    }
                    _ = try? conn.send([1, 2, 3])
                    conn.userdata = ConnKeeper(conn, counter)
                    _ = conn.closeReason
                    _ = conn.localAddress
                    used.withLock { $0 += 1 }
                }
            })
        }
        #expect(eventually(.seconds(20)) { dialed.withLock { $0 } >= 200 })
        done.withLock { $0 = true }
        for user in users { #expect(user.join() == nil) }
        #expect(used.withLock { $0 } > 0)
        #expect(client.stop() == .clientClosed)
        #expect(server.stop() == .serverClosed)
        #expect(eventually { counter.live.withLock { $0 } == 0 })
    }

    @Test("userdata replaced from threads while every receive reads it and connect(false) drops it: every value freed")
    func userdataReplacedWhileLoopReads() throws {
        let counter = LiveCounter()
        let reads = Locked(0)
        let conns = Locked<[TCPConnection]>([])
        struct ReadingHandler: TCPHandler {
            let conns: Locked<[TCPConnection]>
            let reads: Locked<Int>
            func connect(_ conn: TCPConnection, connected: Bool) {
                if connected { conns.withLock { $0.append(conn) } }
                else { _ = conn.userdata }
            }
            func receive(_ conn: TCPConnection, _ buf: [UInt8]) {
                if conn.userdata is ConnKeeper { reads.withLock { $0 += 1 } }
                try? conn.send(buf)
            }
        }
        let server = try ServerHarness(handler: ReadingHandler(conns: conns, reads: reads), codec: nil)
        for round in 0..<20 {
            let peer = try PlainSocket(port: server.port)
            #expect(eventually { conns.withLock { $0.count } == 1 })
            let conn = conns.withLock { $0.removeFirst() }
            let stop = Locked(false)
            var setters: [Background] = []
            for _ in 0..<2 {
                setters.append(Background {
                    while !stop.withLock({ $0 }) { conn.userdata = ConnKeeper(conn, counter) }
                    conn.userdata = ConnKeeper(conn, counter) // after connect(false): refused
                })
            }
            for i in 0..<20 {
                try peer.write([UInt8(truncatingIfNeeded: round), UInt8(i)])
                _ = try peer.read(max: 64)
            }
            if round % 2 == 0 { conn.close() } else { peer.shutdownWrite() }
            #expect(eventually { conn.closeReason != .open })
            usleep(1000)
            stop.withLock { $0 = true }
            for setter in setters { #expect(setter.join() == nil) }
            #expect(eventually { counter.live.withLock { $0 } == 0 })
        }
        #expect(reads.withLock { $0 } > 0)
        #expect(server.stop() == .serverClosed)
    }

    @Test("the last reference to a finished server and client dropped on a loop thread, in connect(false)")
    func serverAndClientFreedOnLoopThread() throws {
        weak var weakServer: TCPServer?
        weak var weakClient: TCPClient?
        let attach = Locked<Holder?>(nil)
        struct AttachHandler: TCPHandler {
            let attach: Locked<Holder?>
            func connect(_ conn: TCPConnection, connected: Bool) {
                if connected { conn.userdata = attach.withLock { holder in
                    defer { holder = nil }
                    return holder
                } }
            }
        }
        do {
            // A server and a client that served and returned; their serving threads hold
            // them weakly, so their last references go into a connection's userdata.
            let finishedServer = TCPServer("127.0.0.1:0")
            let serving = Background { [weak finishedServer] in try finishedServer?.listenAndServe() }
            let port = try finishedServer.waitUntilListening(timeout: .seconds(10))
            let finishedClient = TCPClient("127.0.0.1:\(port)")
            finishedClient.disableRetry()
            let dialing = Background { [weak finishedClient] in try finishedClient?.dialAndServe() }
            #expect(eventually { finishedClient.connection != nil })
            finishedClient.close()
            #expect(dialing.join() as? KNetError == .clientClosed)
            finishedServer.close()
            #expect(serving.join() as? KNetError == .serverClosed)
            weakServer = finishedServer
            weakClient = finishedClient
            attach.withLock { $0 = Holder(server: finishedServer, client: finishedClient) }
        }
        #expect(weakServer != nil && weakClient != nil)
        let server = try ServerHarness(handler: AttachHandler(attach: attach), codec: nil)
        let peer = try PlainSocket(port: server.port)
        #expect(eventually { attach.withLock { $0 == nil } })
        // The connection closes: its connect(false), on the loop thread, drops the userdata
        // and with it the server and the client (knet_server_free / knet_client_free there).
        peer.shutdownWrite()
        #expect(eventually { weakServer == nil && weakClient == nil })
        #expect(server.stop() == .serverClosed)
    }
}
