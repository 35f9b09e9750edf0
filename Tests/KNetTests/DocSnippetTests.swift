#if canImport(Glibc)
import Glibc
#endif
import KNet
import Testing

// The README's Swift quick start, verbatim but for the address (a kernel-chosen port).

struct Echo: TCPHandler {
    func connect(_ conn: TCPConnection, connected: Bool) {
        print(connected ? "up" : "down", conn.remoteAddress ?? "?")
    }
    func receive(_ conn: TCPConnection, _ buf: [UInt8]) {
        try? conn.send(buf)                  // runs on the connection's loop thread
    }
}

struct Framed: Codec {
    func read(from reader: inout ByteReader) throws -> [UInt8] {
        let length = try reader.readInteger(as: UInt32.self)     // big-endian by default
        return try reader.readBytes(Int(length))
    }
    func write(to writer: inout ByteWriter, _ message: [UInt8]) throws {
        writer.writeInteger(UInt32(message.count))
        writer.writeBytes(message)
    }
}

extension KNetTests {
    @Test("README quick start: Echo over StdCodec, server throws .serverClosed, client .clientClosed")
    func readmeQuickStart() throws {
        let server = TCPServer("127.0.0.1:0")
        let serving = Background {
            do {
                try server.listenAndServe(handler: Echo(), codec: StdCodec())   // blocks
            } catch KNetError.serverClosed {
                // server.close() was called
            }
        }
        let port = try server.waitUntilListening(timeout: .seconds(10))
        let client = TCPClient("127.0.0.1:\(port)")
        client.enableRetry()                          // retry failed dials: 1 s doubling to 60 s
        let recorder = RecordingHandler()
        let dialing = Background { try client.dialAndServe(handler: recorder, codec: StdCodec()) }
        #expect(eventually { client.connection != nil })
        try client.connection?.send([1, 2, 3])
        #expect(eventually { recorder.only?.messages.first == [1, 2, 3] })
        client.close()
        #expect(dialing.join() as? KNetError == .clientClosed)
        server.close()
        #expect(serving.join() == nil)
    }

    @Test("README async form: run serves from a Task, cancel closes it and run throws .serverClosed")
    func readmeAsyncRun() async throws {
        let server = TCPServer("127.0.0.1:0")
        let serving = Task { try await server.run(handler: Echo(), codec: StdCodec()) }
        let port = try await offPool { try server.waitUntilListening(timeout: .seconds(10)) }
        let echoed = try await offPool { () -> [UInt8] in
            let peer = try PlainSocket(port: port)
            try peer.write([0, 2, 7, 8])
            return try peer.read(exactly: 4)
        }
        #expect(echoed == [0, 2, 7, 8])
        serving.cancel()                              // = server.close(); run throws .serverClosed
        await #expect(throws: KNetError.serverClosed) { try await serving.value }
    }

    @Test("README Framed codec: a frame split across reads arrives whole")
    func readmeFramedCodec() throws {
        let server = try ServerHarness(handler: Echo(), codec: Framed())
        let peer = try PlainSocket(port: server.port)
        try peer.write([0, 0, 0, 5, 104, 101])
        try peer.write([108, 108, 111])
        #expect(try peer.read(exactly: 9) == [0, 0, 0, 5, 104, 101, 108, 108, 111])
        #expect(server.stop() == .serverClosed)
    }
}
