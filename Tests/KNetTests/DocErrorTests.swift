#if canImport(Glibc)
import Glibc
#endif
import KNet
import Testing

/// A Swift codec whose write throws what it was given (a KNetError or any other error).
private struct ThrowingWriteCodec: Codec {
    struct Other: Error {}
    let error: any Error & Sendable
    func read(from reader: inout ByteReader) throws -> [UInt8] { reader.readAll() }
    func write(to writer: inout ByteWriter, _ message: [UInt8]) throws { throw error }
}

extension KNetTests {
    @Test("the errors the Swift docs name: codec limits, a codec's own errors, calls after close")
    func documentedSwiftErrors() throws {
        // StdCodec: 65535 bytes go, 65536 throw .codec.
        let handler = RecordingHandler()
        let server = try ServerHarness(handler: handler, codec: StdCodec())
        let peer = try PlainSocket(port: server.port)
        #expect(eventually { handler.only?.object != nil })
        let conn = try #require(handler.only?.object)
        try conn.send([UInt8](repeating: 1, count: 65_535))
        #expect(throws: KNetError.codec) { try conn.send([UInt8](repeating: 1, count: 65_536)) }
        // Read while open is kept for connect(false); local never read reads nil after.
        #expect(conn.remoteAddress != nil)
        conn.close()
        #expect(eventually { handler.only?.disconnects == 1 })
        #expect(conn.closeReason == .local)
        #expect(throws: KNetError.connectionClosed) { try conn.send([1]) }
        #expect(throws: KNetError.connectionClosed) { try conn.setNoDelay(true) }
        #expect(conn.localAddress == nil)
        #expect(conn.remoteAddress != nil)
        _ = peer
        #expect(server.stop() == .serverClosed)

        // LengthFieldCodec(lengthBytes: 1): the prefix bounds the body (255).
        let lengthHandler = RecordingHandler()
        let lengthServer = try ServerHarness(handler: lengthHandler, codec: LengthFieldCodec(lengthBytes: 1))
        let lengthPeer = try PlainSocket(port: lengthServer.port)
        #expect(eventually { lengthHandler.only?.object != nil })
        let lengthConn = try #require(lengthHandler.only?.object)
        try lengthConn.send([UInt8](repeating: 2, count: 255))
        #expect(throws: KNetError.codec) { try lengthConn.send([UInt8](repeating: 2, count: 256)) }
        _ = lengthPeer
        #expect(lengthServer.stop() == .serverClosed)

        // A Swift codec's KNetError comes back from send as it is; any other error as .codec.
        for (thrown, expected) in [(KNetError.pendingSendFull as any Error & Sendable, KNetError.pendingSendFull),
                                   (ThrowingWriteCodec.Other(), KNetError.codec)] {
            let codecHandler = RecordingHandler()
            let codecServer = try ServerHarness(handler: codecHandler, codec: ThrowingWriteCodec(error: thrown))
            let codecPeer = try PlainSocket(port: codecServer.port)
            #expect(eventually { codecHandler.only?.object != nil })
            let codecConn = try #require(codecHandler.only?.object)
            #expect(throws: expected) { try codecConn.send([1, 2, 3]) }
            _ = codecPeer
            #expect(codecServer.stop() == .serverClosed)
        }

        // A server closed before it listened: waitUntilListening and listenAndServe say so.
        let closed = TCPServer("127.0.0.1:0")
        #expect(closed.port == 0)
        #expect(throws: KNetError.system(errno: ETIMEDOUT)) { try closed.waitUntilListening(timeout: .milliseconds(1)) }
        closed.close()
        #expect(throws: KNetError.serverClosed) { try closed.waitUntilListening(timeout: .seconds(5)) }
        #expect(throws: KNetError.serverClosed) { try closed.listenAndServe() }
    }

    @Test("a peer's frame over a length codec's maxFrame closes that connection alone with .codec")
    func oversizedIncomingFrameClosesWithCodec() throws {
        let handler = RecordingHandler()
        let server = try ServerHarness(handler: handler, codec: LengthFieldCodec(lengthBytes: 4, maxFrame: 100))
        let bad = try PlainSocket(port: server.port)
        let good = try PlainSocket(port: server.port)
        #expect(eventually { handler.connectionCount == 2 })
        try bad.write([0, 0, 0, 101])
        #expect(eventually { handler.snapshot.connections.values.contains { $0.disconnects == 1 } })
        let closedOne = handler.snapshot.connections.values.first { $0.disconnects == 1 }
        #expect(closedOne?.reasonAtDisconnect == .error(.codec))
        #expect(handler.snapshot.connections.values.filter { $0.disconnects == 0 }.count == 1)
        _ = good
        #expect(server.stop() == .serverClosed)
    }
}
