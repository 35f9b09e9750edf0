import KNet
import Testing

/// Holds weak references to every object a test created.
final class WeakRefs: @unchecked Sendable {
    // Written by the test thread only, before the objects are released; read after.
    weak var server: TCPServer?
    weak var client: TCPClient?
    weak var serverHandler: RecordingHandler?
    weak var clientHandler: RecordingHandler?
    weak var codec: HeaderBodyCodec?
    let serverConnection = WeakConnection()
    weak var clientConnection: TCPConnection?

    var allGone: Bool {
        server == nil && client == nil && serverHandler == nil && clientHandler == nil && codec == nil
            && serverConnection.value == nil && clientConnection == nil
    }
}

/// A weak reference to a connection that a loop thread sets and the test thread reads.
final class WeakConnection: Sendable {
    private struct Ref { weak var conn: TCPConnection? }
    private let ref = Locked(Ref())

    var value: TCPConnection? {
        get { ref.withLock { $0.conn } }
        set { ref.withLock { $0.conn = newValue } }
    }
}

extension KNetTests {
    @Test("servers, clients, handlers, codecs and connections are freed once everything returned")
    func noLeaks() throws {
        let refs = WeakRefs()
        try runAndDropEverything(refs)
        #expect(eventually { refs.allGone })
        #expect(refs.server == nil)
        #expect(refs.client == nil)
        #expect(refs.serverHandler == nil)
        #expect(refs.clientHandler == nil)
        #expect(refs.codec == nil)
        #expect(refs.serverConnection.value == nil)
        #expect(refs.clientConnection == nil)
    }

    private func runAndDropEverything(_ refs: WeakRefs) throws {
        let codec = HeaderBodyCodec()
        let serverHandler = RecordingHandler(echo: true, keepObjects: false,
                                             onConnect: { [weakConnection = refs.serverConnection] conn in
                                                 weakConnection.value = conn
                                             })
        let server = try ServerHarness(handler: serverHandler, codec: codec)
        let clientHandler = RecordingHandler(keepObjects: false, onConnect: { conn in try? conn.send([1, 2, 3]) })
        let client = ClientHarness(port: server.port, handler: clientHandler, codec: codec)
        #expect(eventually { clientHandler.totalMessages == 1 })
        let clientConnection = try #require(client.client.connection)
        refs.server = server.server
        refs.client = client.client
        refs.serverHandler = serverHandler
        refs.clientHandler = clientHandler
        refs.codec = codec
        refs.clientConnection = clientConnection
        #expect(refs.serverConnection.value != nil)
        #expect(client.stop() == .clientClosed)
        #expect(server.stop() == .serverClosed)
        // Kept past disconnect, the connection is still a valid object.
        #expect(clientConnection.closeReason == .error(.clientClosed))
        #expect(throws: KNetError.connectionClosed) { try clientConnection.send([4]) }
    }

    @Test("a handler that keeps its connections is freed with them once the serve calls returned")
    func keepingHandlerNoCycle() throws {
        weak var weakHandler: RecordingHandler?
        weak var weakServerConnection: TCPConnection?
        weak var weakClientConnection: TCPConnection?
        do {
            // Both handlers keep every TCPConnection they see (keepObjects) and never drop it.
            let serverHandler = RecordingHandler(echo: true)
            let clientHandler = RecordingHandler(onConnect: { conn in try? conn.send([7]) })
            let server = try ServerHarness(handler: serverHandler, codec: nil)
            let client = ClientHarness(port: server.port, handler: clientHandler, codec: nil)
            #expect(eventually { clientHandler.totalMessages == 1 })
            weakHandler = serverHandler
            weakServerConnection = serverHandler.only?.object
            weakClientConnection = clientHandler.only?.object
            #expect(weakServerConnection != nil && weakClientConnection != nil)
            #expect(client.stop() == .clientClosed)
            #expect(server.stop() == .serverClosed)
            #expect(serverHandler.only?.disconnects == 1)
        }
        // Only the handlers refer to the connections: nothing may refer back to them.
        #expect(eventually { weakHandler == nil && weakServerConnection == nil && weakClientConnection == nil })
    }

    @Test("a value handler whose state keeps its connections is freed with them")
    func keepingValueHandlerNoCycle() throws {
        weak var weakState: RecordingHandler?
        weak var weakConnection: TCPConnection?
        do {
            // The server's handler is a struct; the object it holds keeps every connection.
            let state = RecordingHandler(echo: true)
            let server = try ServerHarness(handler: ForwardingHandler(state: state), codec: nil)
            let clientHandler = RecordingHandler(keepObjects: false, onConnect: { conn in try? conn.send([7]) })
            let client = ClientHarness(port: server.port, handler: clientHandler, codec: nil)
            #expect(eventually { clientHandler.totalMessages == 1 })
            weakState = state
            weakConnection = state.only?.object
            #expect(weakConnection != nil)
            #expect(client.stop() == .clientClosed)
            #expect(server.stop() == .serverClosed)
            #expect(state.only?.disconnects == 1)
        }
        #expect(eventually { weakState == nil && weakConnection == nil })
    }

    @Test("a kept connection outlives its server and is freed when dropped")
    func connectionOutlivesServer() throws {
        weak var weakConnection: TCPConnection?
        do {
            let handler = RecordingHandler()
            var server: ServerHarness? = try ServerHarness(handler: handler, codec: LengthFieldCodec())
            let peer = try PlainSocket(port: server!.port)
            #expect(eventually { handler.only?.object != nil })
            let conn = try #require(handler.only?.object)
            weakConnection = conn
            #expect(server?.stop() == .serverClosed)
            server = nil
            #expect(eventually { handler.only?.disconnects == 1 })
            // The server is gone; the connection object still answers.
            #expect(throws: KNetError.connectionClosed) { try conn.send([1]) }
            #expect(conn.closeReason == .error(.serverClosed))
            // Every other call on it is harmless.
            #expect(throws: KNetError.connectionClosed) { try conn.setNoDelay(false) }
            conn.setPendingSend(1)
            conn.setMaxQueuedBytes(1)
            conn.shutdown()
            conn.close(timeout: .milliseconds(1))
            conn.close()
            #expect(conn.remoteAddress?.hasPrefix("127.0.0.1:") == true)
            #expect(conn.closeReason == .error(.serverClosed))
            #expect(conn.userdata == nil) // dropped once connect(false) returned (README)
            // Set later (a worker thread may): not kept, so this forms no cycle either.
            final class Keeper: Sendable {
                let conn: TCPConnection
                init(_ conn: TCPConnection) { self.conn = conn }
            }
            conn.userdata = Keeper(conn)
            let kept = conn.userdata != nil
            #expect(!kept)
            // Reflection (dump, a failed expectation) shows safe fields only: the
            // handler the connection points at is gone with its serve call.
            var dumped = ""
            dump(conn, to: &dumped)
            #expect(dumped.contains("remoteAddress") && dumped.contains("127.0.0.1:"))
            handler.state.withLock { $0.connections.removeAll() }
            _ = peer
        }
        #expect(weakConnection == nil)
    }

    @Test("a userdata value that keeps its connection is freed with it after connect(false)")
    func userdataKeepingConnectionNoCycle() throws {
        /// The usual per-connection state: it keeps its connection, and its deinit uses it.
        final class Session: Sendable {
            let conn: TCPConnection
            let deinitSawNil: Locked<Bool?>
            init(_ conn: TCPConnection, _ deinitSawNil: Locked<Bool?>) {
                self.conn = conn
                self.deinitSawNil = deinitSawNil
            }
            deinit {
                let userdata = conn.userdata // must not deadlock: released outside the lock
                deinitSawNil.withLock { $0 = userdata == nil }
            }
        }
        struct SessionHandler: TCPHandler {
            let deinitSawNil: Locked<Bool?>
            let weakConnection: WeakConnection
            let sessionAtDisconnect: Locked<Bool>
            func connect(_ conn: TCPConnection, connected: Bool) {
                if connected {
                    conn.userdata = Session(conn, deinitSawNil)
                    weakConnection.value = conn
                } else {
                    sessionAtDisconnect.withLock { $0 = conn.userdata is Session }
                }
            }
            func receive(_ conn: TCPConnection, _ buf: [UInt8]) {}
        }
        let handler = SessionHandler(deinitSawNil: Locked(nil), weakConnection: WeakConnection(),
                                     sessionAtDisconnect: Locked(false))
        do {
            let server = try ServerHarness(handler: handler, codec: nil)
            let peer = try PlainSocket(port: server.port)
            #expect(eventually { handler.weakConnection.value != nil })
            #expect(server.stop() == .serverClosed)
            _ = peer
        }
        #expect(handler.sessionAtDisconnect.withLock { $0 }) // still there in connect(false)
        #expect(eventually { handler.weakConnection.value == nil })
        #expect(handler.deinitSawNil.withLock { $0 } == true)
    }

    @Test("userdata set on a connection is seen by every callback and other threads")
    func userdataAcrossCallbacks() throws {
        struct Tag: Sendable, Equatable { let name: String }
        let seen = Locked<[Tag?]>([])
        struct TagHandler: TCPHandler {
            let seen: @Sendable (Tag?) -> Void
            func connect(_ conn: TCPConnection, connected: Bool) {
                if connected { conn.userdata = Tag(name: "mine") } else { seen(conn.userdata as? Tag) }
            }
            func receive(_ conn: TCPConnection, _ buf: [UInt8]) { seen(conn.userdata as? Tag) }
        }
        let server = try ServerHarness(handler: TagHandler(seen: { tag in seen.withLock { $0.append(tag) } }), codec: nil)
        let peer = try PlainSocket(port: server.port)
        try peer.write([1])
        #expect(eventually { seen.withLock { $0.count } == 1 })
        try peer.write([2])
        #expect(eventually { seen.withLock { $0.count } == 2 })
        #expect(server.stop() == .serverClosed)
        #expect(seen.withLock { $0 } == [Tag(name: "mine"), Tag(name: "mine"), Tag(name: "mine")])
        _ = peer
    }
}

/// A value handler that forwards every event to the object it holds.
struct ForwardingHandler: TCPHandler {
    let state: RecordingHandler

    func connect(_ conn: TCPConnection, connected: Bool) { state.connect(conn, connected: connected) }
    func receive(_ conn: TCPConnection, _ buf: [UInt8]) { state.receive(conn, buf) }
}

/// A 4-byte length codec (frames up to 1 KiB) that keeps a second reference to the last
/// message it decoded, so a test can see whether anything else still holds it.
final class KeepingLastCodec: Codec {
    let last = Locked<[UInt8]?>(nil)

    var maxFrameSize: Int { 1024 }

    func read(from reader: inout ByteReader) throws -> [UInt8] {
        let length = try reader.readInteger(as: UInt32.self)
        let body = try reader.readBytes(Int(length))
        last.withLock { $0 = body }
        return body
    }

    func write(to writer: inout ByteWriter, _ message: [UInt8]) throws {
        writer.writeInteger(UInt32(message.count))
        writer.writeBytes(message)
    }

    /// Moves the kept message out (the codec no longer holds it).
    func takeLast() -> [UInt8]? { last.withLock { value in defer { value = nil }; return value } }
}

extension KNetTests {
    @Test("a frame a Swift codec decoded over maxFrameSize is not kept by knet once its connection closed")
    func oversizedDecodedFrameNotKept() throws {
        let codec = KeepingLastCodec()
        let handler = RecordingHandler()
        let server = try ServerHarness(handler: handler, codec: codec)
        let peer = try PlainSocket(port: server.port)
        // One write, so the whole 1104-byte frame arrives in one read: the codec decodes
        // it, and it is over maxFrameSize (1024), so the connection closes with .codec.
        let body = [UInt8](repeating: 7, count: 1100)
        try peer.write([0, 0, 0x04, 0x4C] + body)
        #expect(eventually { handler.only?.disconnects == 1 })
        #expect(handler.only?.object?.closeReason == .error(.codec))
        #expect(handler.totalMessages == 0)
        #expect(server.stop() == .serverClosed)
        var message = try #require(codec.takeLast())
        #expect(message == body)
        // The test now holds the only reference unless knet kept one: then writing to it
        // copies it first (up to maxFrameSize and one read kept per loop thread, until
        // that loop decodes its next Swift codec frame).
        let before = message.withUnsafeBufferPointer { UInt(bitPattern: $0.baseAddress) }
        let after = message.withUnsafeMutableBufferPointer { UInt(bitPattern: $0.baseAddress) }
        #expect(before == after, "knet still holds the rejected message")
        _ = peer
    }
}
