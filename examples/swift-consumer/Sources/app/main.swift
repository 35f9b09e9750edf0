// The README snippets compiled as written, then one echo round trip through a
// Swift codec between a TCPServer and a TCPClient.
import KNet
import Foundation

// README snippets, compiled as written.
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

final class Client: TCPHandler {
    let done = DispatchSemaphore(value: 0)
    func connect(_ conn: TCPConnection, connected: Bool) {
        if connected { try? conn.send(Array("hello knet".utf8)) }
    }
    func receive(_ conn: TCPConnection, _ buf: [UInt8]) {
        print("echoed:", String(decoding: buf, as: UTF8.self))
        done.signal()
    }
}

try KNet.setLoopThreads(2)
let server = TCPServer("127.0.0.1:0")
Thread.detachNewThread {
    do { try server.listenAndServe(handler: Echo(), codec: Framed()) } catch KNetError.serverClosed {} catch { print(error) }
}
let port = try server.waitUntilListening(timeout: .seconds(5))
let handler = Client()
let client = TCPClient("127.0.0.1:\(port)")
Thread.detachNewThread {
    do { try client.dialAndServe(handler: handler, codec: Framed()) } catch KNetError.clientClosed {} catch { print(error) }
}
precondition(handler.done.wait(timeout: .now() + 5) == .success, "no echo")
client.close()
server.close()
print("ok, loop threads:", KNet.loopThreadCount)
